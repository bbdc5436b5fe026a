"""mnn's build backend: setuptools' own, less one message that does not apply to mnn.

mnn installs its folders under other names (``distributed/`` as ``mnn.distributed``,
``scripts/`` as ``mnn.scripts``). For such a layout an editable install
(``pip install -e .``) imports the working tree through a finder that maps each
package to its folder, and setuptools then warns, on every install, that folders in
the working directory named like the package "may take precedence during imports".
For mnn they cannot: the only such folder is ``mnn/``, which is the package itself,
and the finder maps ``mnn.distributed`` and ``mnn.scripts`` explicitly (a top-level
``distributed`` is never importable from an install). So that one message is left
out; every other message and every hook are setuptools' own.

pyproject.toml names this module as the backend (``build-backend`` and ``backend-path``).
"""
import warnings

from setuptools import build_meta

__all__ = ["build_wheel", "build_sdist", "build_editable", "get_requires_for_build_wheel",
           "get_requires_for_build_sdist", "get_requires_for_build_editable",
           "prepare_metadata_for_build_wheel", "prepare_metadata_for_build_editable"]

build_wheel = build_meta.build_wheel
build_sdist = build_meta.build_sdist
get_requires_for_build_wheel = build_meta.get_requires_for_build_wheel
get_requires_for_build_sdist = build_meta.get_requires_for_build_sdist
get_requires_for_build_editable = build_meta.get_requires_for_build_editable
prepare_metadata_for_build_wheel = build_meta.prepare_metadata_for_build_wheel
prepare_metadata_for_build_editable = build_meta.prepare_metadata_for_build_editable


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    with warnings.catch_warnings():
        # The summary line of setuptools' message about same-named folders.
        warnings.filterwarnings("ignore", message=r"\s*Editable installation\.")
        return build_meta.build_editable(wheel_directory, config_settings, metadata_directory)
