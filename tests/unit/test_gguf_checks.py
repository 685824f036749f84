"""A GGUF (or any model) that does not match itself is refused at load, in one paragraph: missing tensors,
a vocabulary larger than the embedding, a file cut inside its header."""

from __future__ import annotations

import pytest
from factories import make_tokenizer, save_model_folder
from test_gguf import write_gguf

from prunetune.cli import main
from prunetune.errors import UsageError
from prunetune.loading import TINY_PATH, load_config, load_model, load_tokenizer

pytest.importorskip("gguf", reason="writing a GGUF needs the gguf package (pip install 'gguf>=0.10')")


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(TINY_PATH).eval(), AutoTokenizer.from_pretrained(TINY_PATH)


def test_a_gguf_missing_tensors_is_refused_naming_them(tiny, tmp_path):
    path = tmp_path / "missing.gguf"
    write_gguf(*tiny, path, skip=("blk.0.attn_q.weight", "blk.1.ffn_down.weight"))
    with pytest.raises(UsageError, match=r"does not hold 2 of the \d+ tensors its LlamaForCausalLM needs: "
                                         r"model\.layers\.0\.self_attn\.q_proj\.weight, model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(str(path))


def test_a_complete_gguf_still_loads(tiny, tmp_path):
    path = tmp_path / "whole.gguf"
    write_gguf(*tiny, path)
    tokenizer = load_tokenizer(str(path))
    assert load_model(str(path)).get_input_embeddings().num_embeddings == 4096 and tokenizer.eos_token == "</s>"


def test_a_gguf_vocabulary_beyond_the_embedding_is_refused_at_load(tiny, tmp_path, capsys):
    path = tmp_path / "extra.gguf"
    write_gguf(*tiny, path, extra_tokens=1)
    with pytest.raises(UsageError, match=r"it has 4,096 rows, and the special tokens '<\|extra_0\|>' \(id 4,096\) "
                                         r"lie beyond them"):
        load_tokenizer(str(path))
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(path), "--prune_method", "magnitude", "--eval_dataset", "none",
                 "--device", "cpu", "--save_model", str(out)]) == 2
    assert "would index past it" in capsys.readouterr().err and not out.exists()


def test_a_safetensors_folder_whose_tokenizer_outgrows_the_embedding_is_refused(tmp_path):
    folder = tmp_path / "model"
    save_model_folder(folder, "llama")  # 128 embedding rows
    tokenizer = make_tokenizer()
    tokenizer.add_tokens([f"<extra{i}>" for i in range(40)])
    tokenizer.save_pretrained(folder)
    assert len(load_tokenizer(str(folder))) == 140  # ids no text holds beyond the rows: nothing to refuse
    tokenizer.add_special_tokens({"eos_token": "<|end|>"})
    tokenizer.save_pretrained(folder)
    with pytest.raises(UsageError, match=r"it has 128 rows, and the special tokens '<\|end\|>' \(id 140\) lie beyond"):
        load_tokenizer(str(folder))


@pytest.mark.parametrize("cut", [24, 100])
def test_a_gguf_cut_inside_its_header_is_a_usage_error(tiny, tmp_path, cut):
    whole = tmp_path / "whole.gguf"
    write_gguf(*tiny, whole)
    path = tmp_path / "cut.gguf"
    path.write_bytes(whole.read_bytes()[:cut])
    for load in (load_config, load_tokenizer, load_model):
        with pytest.raises(UsageError, match="may be truncated or corrupt"):
            load(str(path))
