"""Bad input gets a clear error, and the engine goes on serving the other requests."""
import pytest

from heron import LLM, SamplingParams
from heron.core.engine import LLMEngine
from heron.config import EngineConfig
from heron.testing.conformance.helpers import run_to_end

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return LLMEngine(EngineConfig.create(model=tiny_llama, dtype="float32", max_model_len=64))


@pytest.mark.parametrize("prompt,message", [
    ("", "empty"),
    ([], "empty"),
    ({"prompt_token_ids": []}, "empty"),
    (list(range(3, 70)), "max_model_len"),
    ([5, 99999], "outside the vocabulary"),
    (3.5, "must be a string"),
])
def test_bad_prompt_fails_alone(engine, prompt, message):
    engine.add_request("good-1", {"prompt_token_ids": [5, 6, 7]}, GREEDY)
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, GREEDY)
    engine.add_request("good-2", "w1 w2 w3", GREEDY)
    done = run_to_end(engine)
    assert set(done) == {"good-1", "good-2"}
    assert all(len(o.outputs[0].token_ids) == 6 for o in done.values())
    assert engine.scheduler.kv.num_free_blocks == engine.num_blocks


def test_duplicate_request_id(engine):
    engine.add_request("dup", [5, 6], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", [5, 6], GREEDY)
    assert set(run_to_end(engine)) == {"dup"}


def test_abort_frees_blocks_and_others_finish(engine):
    engine.add_request("keep", [5, 6, 7], GREEDY)
    engine.add_request("drop", [8, 9, 10], GREEDY.clone(max_tokens=50))
    engine.step()
    engine.abort_request("drop")
    done = run_to_end(engine)
    assert set(done) == {"keep"}
    assert engine.scheduler.kv.num_free_blocks == engine.num_blocks


def test_generate_with_one_bad_prompt_raises_and_leaves_engine_usable(tiny_llama):
    llm = LLM(tiny_llama, dtype="float32", max_model_len=64)
    with pytest.raises(ValueError, match="empty"):
        llm.generate(["w1 w2", ""], GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert len(llm.generate("w1 w2", GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 6


def test_params_list_must_match_prompts(tiny_llama):
    llm = LLM(tiny_llama, dtype="float32", max_model_len=64)
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(["w1", "w2"], [GREEDY], use_tqdm=False)


def test_model_path_that_does_not_exist():
    with pytest.raises((FileNotFoundError, ValueError), match="does-not-exist"):
        LLM("/nonexistent/does-not-exist")


def test_unsupported_architecture(tmp_path, tiny_llama):
    import json
    import shutil
    path = tmp_path / "weird"
    shutil.copytree(tiny_llama, path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="MambaForCausalLM"):
        LLM(str(path))


def test_unknown_engine_argument_and_bad_values(tiny_llama):
    with pytest.raises(TypeError, match="max_model_length"):
        LLM(tiny_llama, max_model_length=10)
    with pytest.raises(ValueError, match="dtype"):
        LLM(tiny_llama, dtype="int3")
    with pytest.raises(ValueError, match="block_size"):
        LLM(tiny_llama, block_size=3)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(tiny_llama, max_model_len=100000)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLM(tiny_llama, max_model_len=256, enable_chunked_prefill=False, max_num_batched_tokens=64)
