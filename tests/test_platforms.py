"""Plugin loading and device resolution, with fake platforms and fake installed packages.

Each case gives the documented choice or an error that says what is wrong.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import heron
from heron.config import EngineConfig
from heron.entrypoints.cli import main as cli_main
from heron.kernels.reference import ReferenceAttention
from heron.platforms import hookimpl
from heron.platforms.interface import Detection, MemoryInfo, MemoryProfile, Platform
from heron.platforms.plugins import (HeronPluginManager, PluginInfo, make_plugin_manager,
                                     parse_allowlist)
from heron.platforms.probes import TorchBuild, build_from_version
from heron.platforms.registry import (PlatformError, choose_platform, load_extensions,
                                      platform_rows, resolve_platform)

BUILTINS = {"cpu", "cuda", "rocm", "openvino", "xla", "neuron"}


class FakePlatform(Platform):
    device_type = "cpu"

    def __init__(self, name: str, priority: int = 0, available: bool = True,
                 reason: str = "fake hardware found", error: Exception | None = None) -> None:
        self.name, self.priority = name, priority  # type: ignore[misc]
        self._detection, self._error = Detection(available, reason), error

    def detect(self) -> Detection:
        if self._error is not None:
            raise self._error
        return self._detection

    def attention_backend(self, dtype, head_size):
        return ReferenceAttention

    def memory_info(self) -> MemoryInfo:
        return MemoryInfo(100, 50)


class PlatformsPlugin:
    """A plugin object registering the given platforms."""

    def __init__(self, *platforms: object) -> None:
        self.platforms = platforms

    @hookimpl
    def register_platforms(self, register):
        for platform in self.platforms:
            register(platform)


def manager(*plugins: tuple[str, object], allowlist: str | None = None) -> HeronPluginManager:
    pm = HeronPluginManager(parse_allowlist(allowlist))
    for name, plugin in plugins:
        pm.add_plugin(plugin, PluginInfo(name, f"pkg-{name}", "1.0", "tests"))
    pm.check_pending()
    return pm


def fake(*platforms: FakePlatform) -> HeronPluginManager:
    return manager(*((p.name, PlatformsPlugin(p)) for p in platforms))


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch):
    monkeypatch.delenv("HERON_DEVICE", raising=False)
    monkeypatch.delenv("HERON_PLUGINS", raising=False)


# -- resolution -----------------------------------------------------------------------

def test_auto_picks_the_available_platform_of_highest_priority():
    pm = fake(FakePlatform("low", 0), FakePlatform("high", 20),
              FakePlatform("higher-but-absent", 50, available=False, reason="no device"))
    assert choose_platform(pm, "auto").platform.name == "high"
    assert choose_platform(pm, "low").platform.name == "low"


def test_unavailable_platform_by_name_quotes_its_reason():
    pm = fake(FakePlatform("cpu"), FakePlatform("tpu", 30, available=False,
                                                reason="torch_xla not installed"))
    with pytest.raises(PlatformError, match="device='tpu' is not available: torch_xla not installed"):
        choose_platform(pm, "tpu")


def test_detect_that_raises_is_unavailable_with_the_exception_text():
    pm = fake(FakePlatform("cpu"), FakePlatform("flaky", 30, error=RuntimeError("driver exploded")))
    entry = next(e for e in pm.platforms() if e.platform.name == "flaky")
    assert not entry.detection.available
    assert entry.detection.reason == "detect() raised RuntimeError: driver exploded"
    assert choose_platform(pm).platform.name == "cpu"
    with pytest.raises(PlatformError, match="driver exploded"):
        choose_platform(pm, "flaky")


def test_detect_returning_garbage_is_unavailable():
    bad = FakePlatform("bad", 30)
    bad.detect = lambda: True  # type: ignore[method-assign]
    assert not fake(bad).platforms()[0].detection.available


def test_equal_top_priority_is_an_error_naming_both():
    pm = fake(FakePlatform("gpu-a", 40), FakePlatform("gpu-b", 40), FakePlatform("cpu", 0))
    with pytest.raises(PlatformError, match=r"ambiguous: 'gpu-a' \(package pkg-gpu-a 1.0\) and "
                                            r"'gpu-b' \(package pkg-gpu-b 1.0\)"):
        choose_platform(pm, "auto")
    assert choose_platform(pm, "gpu-b").platform.name == "gpu-b"  # naming one settles it


def test_unknown_device_lists_the_installed_ones():
    with pytest.raises(PlatformError, match="unknown device 'tpu'; installed platforms: a, b"):
        choose_platform(fake(FakePlatform("b"), FakePlatform("a", 1)), "tpu")


def test_nothing_available_lists_every_reason():
    pm = fake(FakePlatform("x", available=False, reason="no x"),
              FakePlatform("y", available=False, reason="no y"))
    with pytest.raises(PlatformError, match="no platform is available here.*x: no x; y: no y"):
        choose_platform(pm)


def test_heron_device_overrides_device(monkeypatch):
    pm = fake(FakePlatform("a", 10), FakePlatform("b", 0))
    monkeypatch.setenv("HERON_DEVICE", "b")
    assert resolve_platform("a", pm=pm).name == "b"
    assert resolve_platform("auto", pm=pm).name == "b"


def test_two_plugins_with_the_same_platform_name():
    pm = manager(("one", PlatformsPlugin(FakePlatform("gpu"))),
                 ("two", PlatformsPlugin(FakePlatform("gpu"))))
    with pytest.raises(PlatformError, match="device='gpu' is ambiguous.*pkg-one.*pkg-two"):
        choose_platform(pm, "gpu")


# -- plugins that misbehave -------------------------------------------------------------

class TypoPlugin:
    @hookimpl
    def register_platform(self, register):  # missing "s": no such hook
        raise AssertionError("never called")


class WrongArgsPlugin:
    @hookimpl
    def register_platforms(self, register, extra):
        raise AssertionError("never called")


class RaisingPlugin:
    @hookimpl
    def register_platforms(self, register):
        register(FakePlatform("half"))
        raise RuntimeError("registration failed")


def test_misbehaving_plugins_are_reported_and_the_rest_loads():
    pm = manager(("typo", TypoPlugin()), ("args", WrongArgsPlugin()),
                 ("raising", RaisingPlugin()), ("garbage", PlatformsPlugin("not a platform")),
                 ("good", PlatformsPlugin(FakePlatform("good"))),
                 ("good", PlatformsPlugin(FakePlatform("again"))))
    assert [e.platform.name for e in pm.platforms()] == ["good"]
    errors = {f.name: f.error for f in pm.failed}
    assert "unknown hook" in errors["typo"] and "register_platform" in errors["typo"]
    assert "extra" in errors["args"]
    assert errors["raising"] == "register_platforms raised RuntimeError: registration failed"
    assert "'not a platform'" in errors["garbage"]
    assert "already taken by plugin 'good' (package pkg-good 1.0)" in errors["good"]
    assert all(f.package.startswith("pkg-") for f in pm.failed)
    # A named device still resolves; "auto" refuses to guess around broken plugins.
    assert choose_platform(pm, "good").platform.name == "good"
    with pytest.raises(PlatformError, match="plugin 'typo' \\(package pkg-typo 1.0\\)"):
        choose_platform(pm, "auto")
    with pytest.raises(PlatformError, match="device='raising': plugin 'raising' .* failed to "
                                            "load: register_platforms raised"):
        choose_platform(pm, "raising")


# -- real entry points, from fake installed packages ----------------------------------------

def install_fake_package(root: Path, dist: str, module: str, source: str,
                         entry_point: str | None = None) -> None:
    """A module plus a *.dist-info whose entry_points.txt names it in the group heron."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    name = dist.removeprefix("heron-")
    (info / "entry_points.txt").write_text(f"[heron]\n{name} = {entry_point or module}\n")


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_placeholder_package_raising_importerror_is_reported(fake_site):
    install_fake_package(fake_site, "heron-placeholder", "heron_placeholder", """
        raise ImportError("this name is reserved on PyPI; install the real package from the vendor")
    """)
    pm = make_plugin_manager()
    assert {e.platform.name for e in pm.platforms()} == BUILTINS  # the others still load
    [failed] = pm.failed
    assert (failed.name, failed.package, failed.version) == ("placeholder", "heron-placeholder", "1.0")
    assert failed.error.startswith("ImportError: this name is reserved on PyPI")
    with pytest.raises(PlatformError, match="device='placeholder': plugin 'placeholder' \\(package "
                                            "heron-placeholder 1.0\\) failed to load: ImportError"):
        choose_platform(pm, "placeholder")
    with pytest.raises(PlatformError, match="heron-placeholder"):
        choose_platform(pm, "auto")
    assert choose_platform(pm, "cpu").platform.name == "cpu"
    rows, _ = platform_rows(pm)
    assert any(r.name == "placeholder" and r.available == "ERROR" and "reserved" in r.reason
               for r in rows)


def test_broken_entry_point_is_reported_with_its_package(fake_site):
    install_fake_package(fake_site, "heron-broken", "heron_broken", "VALUE = 1\n",
                         entry_point="heron_broken:no_such_plugin")
    pm = make_plugin_manager()
    [failed] = pm.failed
    assert failed.package == "heron-broken" and failed.error.startswith("AttributeError")
    with pytest.raises(PlatformError, match="unknown device 'nope'.*plugins that failed to load: "
                                            "plugin 'broken' \\(package heron-broken 1.0\\)"):
        choose_platform(pm, "nope")


def test_allowlist(fake_site, monkeypatch):
    install_fake_package(fake_site, "heron-extra", "heron_extra", """
        from heron.platforms import Detection, MemoryInfo, Platform, hookimpl

        class Extra(Platform):
            name, device_type, priority = "extra", "cpu", -5

            def detect(self):
                return Detection(True, "always")

            def attention_backend(self, dtype, head_size):
                raise NotImplementedError

            def memory_info(self):
                return MemoryInfo(1, 1)

        @hookimpl
        def register_platforms(register):
            register(Extra())
    """)
    pm = make_plugin_manager()
    assert "extra" in {e.platform.name for e in pm.platforms()}
    monkeypatch.setenv("HERON_PLUGINS", "cpu, heron-extra")  # entry-point or package names
    pm = make_plugin_manager()
    assert {e.platform.name for e in pm.platforms()} == {"cpu", "extra"}
    monkeypatch.setenv("HERON_PLUGINS", "cpu,typo")
    pm = make_plugin_manager()
    assert {e.platform.name for e in pm.platforms()} == {"cpu"}
    with pytest.raises(PlatformError, match="'extra' \\(package heron-extra 1.0\\) is installed "
                                            "but HERON_PLUGINS='cpu,typo' does not list it"):
        choose_platform(pm, "extra")
    with pytest.raises(PlatformError, match="HERON_PLUGINS names no installed plugin called typo"):
        choose_platform(pm, "cuda-typo")
    monkeypatch.setenv("HERON_PLUGINS", "")
    pm = make_plugin_manager()
    assert pm.platforms() == [] and len(pm.excluded) == len(BUILTINS) + 1
    with pytest.raises(PlatformError, match="HERON_PLUGINS loads no plugin"):
        choose_platform(pm, "auto")


# -- extensions: models and attention backends --------------------------------------------

def test_register_models_and_attention_backends(monkeypatch):
    from heron.kernels.registry import AttentionBackendRegistry
    from heron.models.llama import LlamaForCausalLM
    from heron.models.registry import ModelRegistry

    # Private registries copied so that nothing leaks into other tests.
    monkeypatch.setattr(ModelRegistry, "_models", dict(ModelRegistry._models))
    monkeypatch.setattr(AttentionBackendRegistry, "_backends", dict(AttentionBackendRegistry._backends))

    class MyAttention(ReferenceAttention):
        name = "mine"

    class Extensions:
        @hookimpl
        def register_models(self, register):
            register("MyLlamaForCausalLM", LlamaForCausalLM)

        @hookimpl
        def register_attention_backends(self, register):
            register("mine", MyAttention)

    class Squatter:
        @hookimpl
        def register_attention_backends(self, register):
            register("reference", MyAttention)

    pm = manager(("ext", Extensions()), ("squat", Squatter()))
    load_extensions(pm)
    assert ModelRegistry.resolve(["MyLlamaForCausalLM"]) is LlamaForCausalLM
    assert AttentionBackendRegistry.get("mine") is MyAttention
    assert AttentionBackendRegistry.get("reference") is ReferenceAttention  # not overwritten
    errors = pm.call_each("register_attention_backends",
                          lambda info: {"register": AttentionBackendRegistry.register})
    assert [(i.package, "already taken" in e) for i, e in errors] == [("pkg-squat", True)]
    with pytest.raises(ValueError, match="unknown attention backend 'nope'; registered: .*mine"):
        AttentionBackendRegistry.get("nope")


# -- the built-in platforms -----------------------------------------------------------------

def test_builtins_load_through_entry_points():
    pm = make_plugin_manager()
    assert pm.failed == []
    entries = {e.platform.name: e for e in pm.platforms()}
    assert set(entries) == BUILTINS
    assert all(e.plugin.package == "heron" for e in entries.values())
    assert entries["cpu"].detection.available
    for entry in entries.values():
        assert entry.detection.reason
    chosen = choose_platform(pm)
    top = max(e.platform.priority for e in entries.values() if e.detection.available)
    assert chosen.detection.available and chosen.platform.priority == top


def test_cuda_and_rocm_detection_reasons(monkeypatch):
    from heron.platforms.cuda import platform as cuda
    from heron.platforms.rocm.platform import RocmPlatform

    monkeypatch.setattr(cuda, "device_files", lambda *patterns: [])
    monkeypatch.setattr(cuda, "torch_build", lambda: TorchBuild("2.13.0+cpu", "cpu"))
    reason = cuda.CudaPlatform().detect().reason
    assert "no NVIDIA GPU" in reason and "torch 2.13.0+cpu is a +cpu build" in reason
    monkeypatch.setattr(cuda, "device_files", lambda *patterns: ["/dev/kfd"])
    monkeypatch.setattr(cuda, "torch_build", lambda: TorchBuild("2.5.1+cu124", "cuda"))
    assert RocmPlatform().detect().reason == "torch 2.5.1+cu124 is a +cuda build, not a ROCm one"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "CUDA_VISIBLE_DEVICES hides every device" in cuda.CudaPlatform().detect().reason
    assert build_from_version("2.13.0+cpu").kind == "cpu"
    assert build_from_version("2.5.1+rocm6.2").kind == "rocm"
    assert build_from_version("2.6.0+cu124").kind == "cuda"
    assert build_from_version("2.6.0a0+git1234").kind == "unknown"


def test_neuron_placeholder_package_is_not_a_neuron_sdk(fake_site, monkeypatch):
    from heron.platforms.neuron import platform as neuron

    (fake_site / "torch_neuronx.py").write_text("raise ImportError('placeholder: use the AWS index')\n")
    monkeypatch.setattr(neuron, "device_files", lambda *patterns: ["/dev/neuron0"])
    detection = neuron.NeuronPlatform().detect()
    assert not detection.available
    assert detection.reason == ("torch_neuronx does not import: ImportError: placeholder: "
                                "use the AWS index")


@pytest.mark.parametrize("name", ["xla", "neuron"])
def test_platforms_without_execution_refuse_clearly(name, tiny_llama, monkeypatch):
    from heron import LLM

    platform = next(e.platform for e in make_plugin_manager().platforms() if e.platform.name == name)
    monkeypatch.setattr(type(platform), "detect", lambda self: self.available("pretend device"))
    # Hardware present but no execution path: unavailable, so auto still picks cpu ...
    assert resolve_platform("auto").name == "cpu"
    # ... and naming it fails with a reason that says both.
    with pytest.raises(PlatformError, match=f"pretend device found, but heron cannot run models "
                                            f"on {name} yet"):
        LLM(tiny_llama, device=name)
    assert platform.validate(EngineConfig.create()) == [platform.not_ready()]
    with pytest.raises(NotImplementedError, match="not implemented"):
        platform.memory_info()


# -- the Platform defaults, and the CLI ------------------------------------------------------

def test_kv_cache_bytes_default_formula():
    platform = FakePlatform("x")
    config = EngineConfig.create(gpu_memory_utilization=0.5)
    profile = MemoryProfile(weights_bytes=100, peak_activation_bytes=50,
                            memory=MemoryInfo(total_bytes=1000, available_bytes=700))
    assert platform.kv_cache_bytes(config, profile) == 1000 // 2 - 150
    busy = MemoryProfile(100, 50, MemoryInfo(1000, 200))  # someone else holds memory
    assert platform.kv_cache_bytes(config, busy) == 200
    explicit = EngineConfig.create(kv_cache_memory_bytes=12345)
    assert platform.kv_cache_bytes(explicit, profile) == 12345


def test_heron_platforms_command(capsys):
    assert cli_main(["platforms"]) == 0
    out = capsys.readouterr().out
    header, *rows = out.strip().splitlines()
    assert header.split()[:6] == ["NAME", "PACKAGE", "VERSION", "PRIORITY", "AVAILABLE", "CHOSEN"]
    cpu = next(r for r in rows if r.startswith("cpu "))
    assert cpu.split()[:7] == ["cpu", "heron", heron.__version__, "0", "yes", "*", "gloo"]
    from heron.platforms.registry import platform_rows
    tp = {row.name: row.tensor_parallel for row in platform_rows(make_plugin_manager())[0]}
    assert tp["cpu"] == "gloo" and tp["cuda"] == "nccl" and tp["xla"] == "no"
    assert cli_main(["platforms", "--device", "nope"]) == 1
    assert "unknown device 'nope'" in capsys.readouterr().out


def test_platform_contract_imports_nothing_of_the_worker_side():
    """Dependencies run one way: executors and workers use the platform contract, never
    the reverse (and detection stays free of torch)."""
    import subprocess
    import sys
    code = ("import sys, heron.platforms, heron.platforms.interface, heron.platforms.hookspecs\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('heron.worker', 'torch')))\n"
            "print(','.join(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"imported: {result.stdout.strip()}"
