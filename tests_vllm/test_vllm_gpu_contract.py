"""What the CPU lane cannot run, checked against the installed vLLM: the GPU path uses the very
calls the CPU tests exercise, and the engine configures vLLM for a GPU as intended."""

import inspect

import pytest

import actors.vllm_engine as vllm_engine


def test_weight_reload_on_gpu_is_the_method_the_cpu_tests_run():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as GPUModelRunnerV2
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for runner in (GPUModelRunner, GPUModelRunnerV2):
        params = inspect.signature(runner.reload_weights).parameters
        assert "weights_iterator" in params and params["is_checkpoint_format"].default is True
    assert "reload_weights" not in CPUModelRunner.__dict__  # inherited: the CPU run is the GPU code
    assert CPUModelRunner.reload_weights is GPUModelRunner.reload_weights


def test_gpu_engine_settings_and_sleep_wake(monkeypatch, tiny_model_dir):
    calls = []

    class FakeLLM:  # records what a GPU engine would be started with
        def __init__(self, **kwargs):
            calls.append(("init", kwargs))
            self.llm_engine = type("E", (), {"model_config": type("M", (), {"get_vocab_size": lambda s: 100})()})()

        def sleep(self, level):
            calls.append(("sleep", level))

        def wake_up(self):
            calls.append(("wake_up", None))

        def reset_prefix_cache(self):
            calls.append(("reset_prefix_cache", None))

    class CudaPlatform:
        def is_sleep_mode_available(self):
            return True

        def is_cpu(self):
            return False

    import vllm
    import vllm.platforms

    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    monkeypatch.setattr(vllm.platforms, "current_platform", CudaPlatform())
    engine = vllm_engine.VLLMEngine(tiny_model_dir, dtype="bfloat16", tensor_parallel_size=2,
                                    gpu_memory_utilization=0.6)
    kwargs = calls[0][1]
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["gpu_memory_utilization"] == 0.6
    assert kwargs["enable_sleep_mode"] and not kwargs["enforce_eager"] and kwargs["enable_prefix_caching"]
    assert kwargs["logprobs_mode"] == "processed_logprobs" and kwargs["dtype"] == "bfloat16"
    assert kwargs["worker_extension_cls"] == vllm_engine.WORKER_EXTENSION
    engine.sleep(level=1)
    engine.wake_up()
    assert [c[0] for c in calls[1:]] == ["sleep", "wake_up", "reset_prefix_cache"]


def test_sleep_is_refused_where_the_platform_has_none(monkeypatch, tiny_model_dir):
    import vllm

    monkeypatch.setattr(vllm, "LLM", lambda **kw: type("L", (), {"llm_engine": type("E", (), {
        "model_config": type("M", (), {"get_vocab_size": lambda s: 100})()})()})())
    engine = vllm_engine.VLLMEngine(tiny_model_dir)  # the real platform here: CPU
    with pytest.raises(RuntimeError, match="sleep mode is not available"):
        engine.sleep()
