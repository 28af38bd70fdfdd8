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
