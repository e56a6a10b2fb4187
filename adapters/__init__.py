"""Model adapters: one file per model family, registered lazily in ``vlpbench.registry.ADAPTERS``.

Built-in adapters (``vlpbench run --model NAME``):

- ``g2d``: G2D (NeurIPS 2024) ResNet-50 U-Net; loads ``*_encoder.pth``, ``*_encoder_decoder.pth`` and the
  full pre-training checkpoint, detected from the keys (``g2d.py``).
- ``resnet50``: a torchvision ResNet-50 state dict from a local file, e.g. ImageNet weights (``resnet.py``).
- ``random``: a seeded, randomly initialised ResNet-50; takes no checkpoint (``resnet.py``).
- one file per other family, named as the adapter: the registrations below list every one
  (``vlpbench models`` prints each with its model card).

Adding a model: subclass ``vlpbench.adapters.base.Adapter``, implement ``map_weights`` with the helpers in
``base.py``, and either add one ``ADAPTERS.register`` line below (a built-in) or publish it from your own
package as a plug-in: an entry point ``NAME = "module:AdapterClass"`` in the group ``vlpbench.adapters``
(README, "Adding a model"). Plug-ins are discovered once, on the first ``get_adapter``, ``build_adapter``,
``adapter_names`` or ``plugins`` call. Registration is a string either way, so listing model names imports
neither torch nor any adapter module.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlpbench.errors import VlpbenchError
from vlpbench.registry import ADAPTERS

if TYPE_CHECKING:
    from vlpbench.adapters.base import Adapter

ENTRY_POINT_GROUP = "vlpbench.adapters"

ADAPTERS.register("g2d", "vlpbench.adapters.g2d:G2DAdapter")
ADAPTERS.register("resnet50", "vlpbench.adapters.resnet:TorchvisionResNet50")
ADAPTERS.register("random", "vlpbench.adapters.resnet:RandomResNet50")
ADAPTERS.register("mgca", "vlpbench.adapters.mgca:MgcaAdapter")
ADAPTERS.register("generic", "vlpbench.adapters.generic:GenericAdapter")
ADAPTERS.register("clip", "vlpbench.adapters.clip:ClipAdapter")
ADAPTERS.register("medklip", "vlpbench.adapters.medklip:MedKLIPAdapter")
ADAPTERS.register("mavl", "vlpbench.adapters.mavl:MAVLAdapter")
ADAPTERS.register("convirt", "vlpbench.adapters.convirt:ConVIRTAdapter")
ADAPTERS.register("mflag", "vlpbench.adapters.mflag:MFlagAdapter")
ADAPTERS.register("prior", "vlpbench.adapters.prior:PriorAdapter")
ADAPTERS.register("gloria", "vlpbench.adapters.gloria:GloriaAdapter")
ADAPTERS.register("biovil", "vlpbench.adapters.biovil:BioVilAdapter")
ADAPTERS.register("mgca_vit", "vlpbench.adapters.mgca_vit:MgcaVitAdapter")
ADAPTERS.register("biomedclip", "vlpbench.adapters.biomedclip:BiomedClipAdapter")
ADAPTERS.register("mrm", "vlpbench.adapters.mrm:MrmAdapter")
ADAPTERS.register("refers", "vlpbench.adapters.refers:RefersAdapter")
ADAPTERS.register("kad", "vlpbench.adapters.kad:KADAdapter")
ADAPTERS.register("medclip", "vlpbench.adapters.medclip:MedCLIPAdapter")
ADAPTERS.register("cxrclip", "vlpbench.adapters.cxrclip:CXRClipAdapter")
ADAPTERS.register("rad_dino", "vlpbench.adapters.rad_dino:RadDinoAdapter")
ADAPTERS.register("medsiglip", "vlpbench.adapters.medsiglip:MedSiglipAdapter")
ADAPTERS.register("xraysiglip", "vlpbench.adapters.xraysiglip:XraySiglipAdapter")
ADAPTERS.register("carzero", "vlpbench.adapters.carzero:CARZeroAdapter")
ADAPTERS.register("ark", "vlpbench.adapters.ark:ArkAdapter")


class PluginError(VlpbenchError):
    """A plug-in adapter clashes with another adapter's name, or cannot be imported or used."""


@dataclass(frozen=True)
class Plugin:
    """An adapter registered by an installed package through the ``vlpbench.adapters`` entry-point group.

    Attributes:
        name: the entry point's name, which is the model name.
        target: the entry point's value, ``"module:AdapterClass"``.
        package: name of the distribution that declares the entry point.
        version: that distribution's version.
    """

    name: str
    target: str
    package: str
    version: str

    def origin(self) -> str:
        """Where the plug-in comes from, for messages: entry point, group and package."""
        return (f"entry point {self.name} = {self.target} (group {ENTRY_POINT_GROUP}) "
                f"of package {self.package} {self.version}")


# None until the first registry use discovers the installed plug-ins.
_plugins: dict[str, Plugin] | None = None


def plugins() -> dict[str, Plugin]:
    """Installed plug-in adapters by model name, discovered and registered on the first call.

    Raises:
        PluginError: a plug-in uses the name of a built-in adapter or of another package's plug-in; the
            message names both packages. Nothing is registered then, and every later call raises again.
    """
    global _plugins
    if _plugins is None:
        found = _discover()
        for plugin in found.values():
            ADAPTERS.register(plugin.name, plugin.target)
        _plugins = found
    return _plugins


def _discover() -> dict[str, Plugin]:
    """Read the entry points of the group, refusing any name claimed twice (no import happens here)."""
    found: dict[str, Plugin] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        # ep.dist is None only for entry points built by hand, never for installed ones.
        package, version = (ep.dist.name, ep.dist.version) if ep.dist is not None else ("(unknown)", "")
        plugin = Plugin(ep.name, ep.value, package, version)
        if ep.name in ADAPTERS:
            raise PluginError(
                f"package {package} registers a plug-in adapter named {ep.name!r} ({ep.value}), but "
                f"{ep.name!r} is a built-in adapter of package vlpbench; uninstall {package} or have its "
                f"entry point renamed"
            )
        other = found.get(ep.name)
        if other is not None and other != plugin:
            raise PluginError(
                f"two packages register a plug-in adapter named {ep.name!r}: {other.package} "
                f"({other.target}) and {package} ({ep.value}); uninstall one of them"
            )
        found[ep.name] = plugin
    return found


def adapter_names() -> list[str]:
    """Names of the built-in and plug-in adapters, sorted; imports no adapter module."""
    plugins()
    return ADAPTERS.names()


def get_adapter(name: str) -> type[Adapter]:
    """Return the adapter class registered as ``name`` (``RegistryError`` with suggestions if unknown).

    Raises:
        PluginError: ``name`` is a plug-in that fails to import, or whose entry point does not name an
            ``Adapter`` subclass with ``name`` as its ``name``; the message names the entry point and package.
    """
    plugin = plugins().get(name)
    if plugin is None:
        return ADAPTERS.get(name)
    try:
        cls = ADAPTERS.get(name)
    except Exception as e:  # a third-party module can raise anything while it is imported
        raise PluginError(f"plug-in adapter {name!r} failed to import ({plugin.origin()}): "
                          f"{type(e).__name__}: {e}") from e

    from vlpbench.adapters.base import Adapter

    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise PluginError(f"plug-in adapter {name!r} is not a subclass of vlpbench.adapters.base.Adapter "
                          f"({plugin.origin()})")
    if getattr(cls, "name", None) != name:
        # Result records name the model by the class attribute; it must agree with what users type.
        raise PluginError(f"plug-in adapter {name!r}: its class sets name = {getattr(cls, 'name', None)!r}, "
                          f"not {name!r} ({plugin.origin()})")
    return cls


def build_adapter(name: str, checkpoint: str | Path | None = None, **options: Any) -> Adapter:
    """Instantiate adapter ``name`` on ``checkpoint`` with ``options``; loading is strict (see ``Adapter``)."""
    return get_adapter(name)(checkpoint, **options)
