# Shared by the base build (CMakeLists.txt) and the GPU plugin builds (plugins/*/CMakeLists.txt): obtain the
# pinned llama.cpp source and set the options both must agree on, since a plugin's backend module links
# against the base wheel's ggml-base. Needs LLMPLACE_ROOT and Python_EXECUTABLE; sets LLAMA_CPP_DIR and
# LLMPLACE_LLAMA_COMMIT.
set(LLAMA_CPP_DIR ${LLMPLACE_ROOT}/vendor/llama.cpp)
execute_process(
    COMMAND ${Python_EXECUTABLE} ${LLMPLACE_ROOT}/tools/vendor_llama_cpp.py
    RESULT_VARIABLE vendor_result)
if (NOT vendor_result EQUAL 0)
    message(FATAL_ERROR "Could not obtain the pinned llama.cpp source (tools/vendor_llama_cpp.py failed)")
endif()
execute_process(
    COMMAND ${Python_EXECUTABLE} ${LLMPLACE_ROOT}/tools/vendor_llama_cpp.py --print-commit
    OUTPUT_VARIABLE LLMPLACE_LLAMA_COMMIT OUTPUT_STRIP_TRAILING_WHITESPACE)
set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS ${LLMPLACE_ROOT}/vendor/llama.cpp.pin)

set(BUILD_SHARED_LIBS ON CACHE BOOL "" FORCE)
set(GGML_BACKEND_DL ON CACHE BOOL "" FORCE)    # backends are modules loaded at run time (plugins)
set(GGML_NATIVE OFF CACHE BOOL "" FORCE)       # wheels run on other machines than the builder
set(GGML_OPENMP OFF CACHE BOOL "" FORCE)       # ggml's own thread pool; no libgomp to ship
foreach (part TESTS TOOLS EXAMPLES SERVER APP)
    set(LLAMA_BUILD_${part} OFF CACHE BOOL "" FORCE)
endforeach()
set(LLAMA_OPENSSL OFF CACHE BOOL "" FORCE)
set(CMAKE_POSITION_INDEPENDENT_CODE ON)

# Unique file names and SONAMEs (libllmplace-<lib>.so): llama-cpp-python ships libllama.so, libggml.so,
# libggml-base.so.0 ... and a process importing both would otherwise bind to whichever copy loaded first.
# One file per library (SONAME = file name): wheels cannot hold the libX.so.0 → libX.so.0.5.0 symlinks.
function(llmplace_rename_libraries)
    foreach (lib ${ARGN})
        set_target_properties(${lib} PROPERTIES OUTPUT_NAME llmplace-${lib})
        set_property(TARGET ${lib} PROPERTY VERSION)
        set_property(TARGET ${lib} PROPERTY SOVERSION)
    endforeach()
endfunction()

# The end of every GPU plugin build (plugins/*/CMakeLists.txt), after ggml's add_subdirectory: the backend module
# `module` (ggml-cuda, ggml-vulkan) links against the base wheel's renamed ggml-base (already loaded by llmplace when
# the module is; RUNPATH to the base wheel's llmplace/lib beside the plugin's package is the fallback for a dlopen
# before that), and is installed with the plugin's _build_info.py (from its _build_info.py.in: the build ID that
# llmplace checks before loading the module) into the package folder LLMPLACE_PLUGIN_PACKAGE.
function(llmplace_plugin_module module)
    llmplace_rename_libraries(ggml-base)
    set_target_properties(${module} PROPERTIES INSTALL_RPATH "$ORIGIN/../llmplace/lib")
    install(TARGETS ${module} LIBRARY DESTINATION ${LLMPLACE_PLUGIN_PACKAGE} NAMELINK_SKIP COMPONENT plugin)
    configure_file(${CMAKE_CURRENT_SOURCE_DIR}/_build_info.py.in ${CMAKE_BINARY_DIR}/_build_info.py @ONLY)
    install(FILES ${CMAKE_BINARY_DIR}/_build_info.py DESTINATION ${LLMPLACE_PLUGIN_PACKAGE} COMPONENT plugin)
    add_custom_target(plugin_all ALL DEPENDS ${module})
endfunction()
