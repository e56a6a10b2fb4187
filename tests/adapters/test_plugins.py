"""Plug-in adapters from the ``vlpbench.adapters`` entry-point group, and the README's worked plug-in.

Packages are "installed" without pip or network: a ``<dist>-<version>.dist-info`` folder with METADATA and
entry_points.txt next to the module, on a sys.path entry, is what importlib.metadata discovers.
"""

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch

import vlpbench.adapters as adapters
from vlpbench.adapters import PluginError, adapter_names, build_adapter, get_adapter
from vlpbench.adapters.base import resnet50_encoder_shapes
from vlpbench.cli import main
from vlpbench.registry import ADAPTERS

README = Path(__file__).resolve().parents[2] / "README.md"
# A fenced block preceded by "<!-- file: PATH -->" is the content of PATH in the README's example.
FILE_BLOCK = re.compile(r"<!-- file: (?P<path>\S+) -->\n```\w*\n(?P<body>.*?)\n```", re.S)


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A fresh sys.path folder to install fake packages into; sys.path, modules and registry restored after."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    # The registry and the discovery state are module globals: work on copies so nothing leaks.
    monkeypatch.setattr(ADAPTERS, "_targets", dict(ADAPTERS._targets))
    monkeypatch.setattr(adapters, "_plugins", None)
    yield folder
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(folder)):
            del sys.modules[name]


def install(site: Path, dist: str, version: str, entry_points: dict[str, str], files: dict[str, str]) -> None:
    """Write ``files`` into ``site`` plus the dist-info that declares ``entry_points`` for ``dist``."""
    for name, text in files.items():
        (site / name).write_text(text)
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[vlpbench.adapters]\n{lines}")
    importlib.invalidate_caches()  # the import system caches directory listings


def readme_files() -> dict[str, str]:
    """The README's example files, by path."""
    files = {m["path"]: m["body"] + "\n" for m in FILE_BLOCK.finditer(README.read_text())}
    assert set(files) == {"my-adapter/pyproject.toml", "my-adapter/my_adapter.py"}
    return files


def test_the_readme_plugin_is_discovered_lazily_listed_and_loads_a_checkpoint(site, tmp_path, capsys):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    files = readme_files()
    project = tomllib.loads(files["my-adapter/pyproject.toml"])["project"]
    # What pip would write for this pyproject: the distribution's metadata and its entry points.
    install(site, project["name"], project["version"], project["entry-points"]["vlpbench.adapters"],
            {Path(path).name: text for path, text in files.items() if path.endswith(".py")})

    assert "mymodel" in adapter_names()
    assert "my_adapter" not in sys.modules  # listing names does not import the plug-in

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    block = out[out.index("mymodel"):].split("\n\n")[0]
    assert "MyModel ResNet-50 image encoder" in block
    assert "capabilities: features" in block
    assert "checkpoints:  mymodel.pth: image_encoder.*" in block
    assert "plug-in from: my-adapter 0.1" in block
    assert "g2d" in out  # built-ins are listed next to it

    shapes = resnet50_encoder_shapes()
    state = {f"image_encoder.{k}": torch.zeros(shape, dtype=shape.dtype) for k, shape in shapes.items()}
    state |= {"image_encoder.fc.weight": torch.zeros(1000, 2048), "image_encoder.fc.bias": torch.zeros(1000),
              "text_encoder.embeddings.weight": torch.zeros(8, 4)}
    checkpoint = tmp_path / "mymodel.pth"
    torch.save(state, checkpoint)

    adapter = build_adapter("mymodel", checkpoint)
    assert adapter.report.ok
    assert len(adapter.report.mapped) == len(shapes) == 318
    assert sum(len(keys) for keys in adapter.report.ignored.values()) == 3
    assert adapter.describe()["adapter"] == "mymodel"

    assert main(["inspect", "--model", "mymodel", "--checkpoint", str(checkpoint)]) == 0
    assert "mapped: 318 keys" in capsys.readouterr().out


def test_a_plugin_named_like_a_builtin_is_an_error_naming_both_packages(site, capsys):
    install(site, "evil-pkg", "1.0", {"g2d": "evil:G2D"}, {})
    with pytest.raises(PluginError, match=r"evil-pkg.*'g2d'.*built-in adapter of package vlpbench"):
        get_adapter("resnet50")
    assert main(["models"]) == 2
    assert "evil-pkg" in capsys.readouterr().err


def test_two_plugins_with_one_name_are_an_error_naming_both_packages(site):
    install(site, "pkg-a", "1.0", {"twin": "a_mod:Twin"}, {})
    install(site, "pkg-b", "2.0", {"twin": "b_mod:Twin"}, {})
    with pytest.raises(PluginError, match=r"'twin'.*pkg-[ab] \(.\_mod:Twin\) and pkg-[ab] \(.\_mod:Twin\)"):
        build_adapter("twin")


def test_a_plugin_that_fails_to_import_is_listed_with_the_error_and_named_when_used(site, capsys):
    install(site, "broken-pkg", "0.3", {"broken": "broken_plugin:Adapter"},
            {"broken_plugin.py": "import a_module_that_is_not_installed\n"})
    install(site, "odd-pkg", "0.1", {"odd": "not_an_adapter:thing"}, {"not_an_adapter.py": "thing = 42\n"})

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    broken = out[out.index("broken "):].split("\n\n")[0]
    assert "cannot be used" in broken and "a_module_that_is_not_installed" in broken
    assert "plug-in from: broken-pkg 0.3" in broken
    assert "resnet50" in out

    with pytest.raises(PluginError, match=r"'broken' failed to import \(entry point broken = broken_plugin:Adapter"
                                          r".*broken-pkg 0.3\): ModuleNotFoundError"):
        build_adapter("broken")
    with pytest.raises(PluginError, match=r"'odd' is not a subclass of .*Adapter.*odd-pkg"):
        get_adapter("odd")
