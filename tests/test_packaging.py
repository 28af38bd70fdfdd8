"""The distributions fit together: each GPU extra of the base (`pip install "llmplace[cuda13]"`) names a plugin
project of this repository, every plugin pins exactly the base's version, installs into a package folder that
llmplace's backend loader looks in, and the CUDA plugins share one CMake project."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from llmplace.backends import PLUGIN_PACKAGES

ROOT = Path(__file__).resolve().parent.parent


def _project(path: Path) -> dict:
    return tomllib.loads(path.read_text())


def _plugins() -> dict[str, tuple[Path, dict]]:
    """Distribution name -> (plugin folder, its pyproject), for every plugins/*/pyproject.toml."""
    found = {}
    for pyproject in sorted((ROOT / "plugins").glob("*/pyproject.toml")):
        data = _project(pyproject)
        found[data["project"]["name"]] = (pyproject.parent, data)
    return found


def test_every_gpu_extra_names_a_plugin_of_this_version():
    base = _project(ROOT / "pyproject.toml")["project"]
    plugins = _plugins()
    extras = {name: reqs for name, reqs in base["optional-dependencies"].items()
              if any(r.startswith("llmplace-") for r in reqs)}
    assert {"cuda13", "cuda12", "vulkan"} <= set(extras)
    for extra, requirements in extras.items():
        assert requirements == [f"llmplace-{extra}=={base['version']}"], (extra, requirements)
        assert f"llmplace-{extra}" in plugins, f"extra {extra} names no plugins/*/pyproject.toml"


def test_every_plugin_pins_the_base_and_installs_where_llmplace_looks():
    version = _project(ROOT / "pyproject.toml")["project"]["version"]
    plugins = _plugins()
    assert {"llmplace-cuda13", "llmplace-cuda12", "llmplace-vulkan"} <= set(plugins)
    for name, (folder, data) in plugins.items():
        project, build = data["project"], data["tool"]["scikit-build"]
        assert project["version"] == version and project["dependencies"] == [f"llmplace=={version}"], name
        package = name.replace("-", "_")
        assert build["wheel"]["packages"] == [package], name
        assert package in PLUGIN_PACKAGES, f"{package} is not in llmplace.backends.PLUGIN_PACKAGES"
        assert (folder / package / "__init__.py").is_file(), name
        defines = build["cmake"]["define"]
        assert defines["PROJECT_VERSION_OVERRIDE"] == version, name
        # the CMake project's install folder is the package (one CMakeLists may serve several packages)
        source = folder / build.get("cmake", {}).get("source-dir", ".")
        cmake = (source / "CMakeLists.txt").read_text()
        if "LLMPLACE_PLUGIN_PACKAGE" in cmake:
            default = re.search(r"set\(LLMPLACE_PLUGIN_PACKAGE (\w+)[ )]", cmake).group(1)
            assert defines.get("LLMPLACE_PLUGIN_PACKAGE", default) == package, name
        else:
            assert f"DESTINATION {package}" in cmake, name


def test_cuda_plugins_share_one_cmake_project():
    plugins = _plugins()
    cuda12_folder, cuda12 = plugins["llmplace-cuda12"]
    cuda13_folder, _ = plugins["llmplace-cuda13"]
    source = (cuda12_folder / cuda12["tool"]["scikit-build"]["cmake"]["source-dir"]).resolve()
    assert source == cuda13_folder.resolve()
