"""tests/components.py, the strict skip rule: a missing component skips locally, fails under
strict mode ($CI=true or $RESNET_FUSED_STRICT_TESTS=1); explicit opt-outs and "no GPU" skip."""
from __future__ import annotations

import textwrap

import pytest
import torch

import components

Skipped = pytest.skip.Exception
Failed = pytest.fail.Exception
MODES = ["CI", components.STRICT_ENV]
ALL_OPT_OUTS = sorted({env for envs in components.OPT_OUTS.values() for env in envs})


@pytest.fixture
def local(monkeypatch):
    """Not strict, no opt-out set (whatever the run's own environment says)."""
    for env in ["CI", components.STRICT_ENV] + ALL_OPT_OUTS:
        monkeypatch.delenv(env, raising=False)
    return monkeypatch


@pytest.fixture(params=MODES)
def strict(local, request):
    local.setenv(request.param, "true" if request.param == "CI" else "1")
    assert components.strict()
    return local


def test_present_component_passes_in_every_mode(local):
    components.require("triton", None)
    local.setenv("CI", "true")
    components.require("triton", None)


def test_missing_component_skips_locally(local):
    assert not components.strict()
    with pytest.raises(Skipped, match="triton unavailable: no module named triton"):
        components.require("triton", "no module named triton")


def test_missing_component_fails_under_strict_mode(strict):
    with pytest.raises(Failed, match="extension is missing: _C was built against torch 1.0 "
                                     "-- a failure, not a skip, in strict mode.*"
                                     "RESNET_FUSED_DISABLE_EXT=1 or .RESNET_FUSED_NO_EXT=1$"):
        components.require("extension", "_C was built against torch 1.0")
    with pytest.raises(Failed, match="onednn is missing: private ops gone -- .*strict mode"):
        components.require("onednn", "private ops gone")


def test_false_values_are_not_strict(local):
    local.setenv("CI", "false")
    local.setenv(components.STRICT_ENV, "0")
    assert not components.strict()
    with pytest.raises(Skipped):
        components.require("onednn", "private ops gone")


@pytest.mark.parametrize("component,env", [("extension", "RESNET_FUSED_DISABLE_EXT"),
                                           ("extension", "RESNET_FUSED_NO_EXT"),
                                           ("cuda-kernels", "RESNET_FUSED_NO_CUDA"),
                                           ("onnx", "RESNET_FUSED_NO_ONNX")])
def test_opt_out_skips_under_strict_mode(strict, component, env):
    strict.setenv(env, "1")
    with pytest.raises(Skipped, match=f"{component} switched off by \\${env}: gone"):
        components.require(component, "gone")


def test_an_opt_out_covers_only_its_component(strict):
    strict.setenv("RESNET_FUSED_NO_ONNX", "1")
    with pytest.raises(Failed):
        components.require("extension", "gone")


def test_unknown_component_is_an_error(local):
    with pytest.raises(ValueError, match="unknown test component 'trition'"):
        components.require("trition", None)


def test_importorskip(local):
    assert components.importorskip("torch", "triton") is torch
    with pytest.raises(Skipped, match="onnx unavailable: importing no_such_module_xyz failed"):
        components.importorskip("no_such_module_xyz", "onnx")
    local.setenv("CI", "true")
    with pytest.raises(Failed, match="onnx is missing.*no_such_module_xyz"):
        components.importorskip("no_such_module_xyz", "onnx")
    local.setenv("RESNET_FUSED_NO_ONNX", "1")
    with pytest.raises(Skipped, match="switched off by \\$RESNET_FUSED_NO_ONNX"):
        components.importorskip("no_such_module_xyz", "onnx")


def test_no_gpu_skips_under_strict_mode(strict):
    strict.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(Skipped, match="needs a CUDA GPU"):
        components.no_gpu()
    with pytest.raises(Skipped, match="needs a CUDA GPU"):
        components.backend("cuda", "cuda")


def test_backend_skips_where_it_cannot_run_by_design(strict):
    from resnet_fused import backends
    strict.delenv("TRITON_INTERPRET", raising=False)
    strict.setattr(backends, "unavailable_reason", lambda name, device=None: f"{name} cannot")
    with pytest.raises(Skipped, match="does not run on cpu"):
        components.backend("cuda", "cpu")
    with pytest.raises(Skipped, match="needs TRITON_INTERPRET=1"):
        components.backend("triton", "cpu")
    with pytest.raises(Failed, match="onednn is missing: backend onednn unavailable"):
        components.backend("onednn", "cpu")
    strict.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(Failed, match="triton is missing"):
        components.backend("triton", "cpu")


MARKED = textwrap.dedent("""
    import pytest
    import components

    pytestmark = components.needs("extension", {module_reason!r})

    @components.needs("onednn", "private ops gone")
    def test_missing():
        pass

    @components.needs("onednn", None)
    def test_present():
        pass

    @components.needs_gpu("cuda-kernels", lambda: 1 / 0)  # the reason is asked only with a GPU
    def test_gpu():
        pass
""")
CONFTEST = textwrap.dedent("""
    import pytest
    import components

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(item):
        components.run_marks(item)
""")


@pytest.mark.parametrize("mode", ["local", "strict", "strict+opt-out"])
def test_marks_through_the_conftest_hook(pytester, local, monkeypatch, mode):
    """The `requires` marks (module level, function level, GPU) in a real pytest run."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if mode != "local":
        local.setenv("CI", "true")
    if mode == "strict+opt-out":
        local.setenv("RESNET_FUSED_DISABLE_EXT", "1")
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nmarkers =\n    requires: see components.py\n")
    pytester.makepyfile(test_module_mark=MARKED.format(module_reason="extension gone"),
                        test_test_marks=MARKED.format(module_reason=None))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rsE", "test_module_mark.py")
    if mode == "local":  # all skip: the module needs the missing extension
        result.assert_outcomes(skipped=3)
    elif mode == "strict":  # the module mark fails the tests at set-up (an error); the GPU test
        result.assert_outcomes(errors=2, skipped=1)  # skips first: no GPU here
        result.stdout.fnmatch_lines(["*extension is missing*extension gone*"])
    else:  # extension opted out: skips, however strict (test_missing's onednn still fails)
        result.assert_outcomes(errors=1, skipped=2)
        result.stdout.fnmatch_lines(["*switched off by $RESNET_FUSED_DISABLE_EXT*"])
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rsE", "test_test_marks.py")
    if mode == "local":
        result.assert_outcomes(passed=1, skipped=2)
    else:  # test_missing fails; the GPU test skips without a GPU even under strict mode
        result.assert_outcomes(passed=1, skipped=1, errors=1)
        result.stdout.fnmatch_lines(["*onednn is missing*private ops gone*",
                                     "*needs a CUDA GPU*"])
