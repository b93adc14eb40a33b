"""Prompts the model cannot read are refused in the parent, torch-free, counted exactly as
Sam3Processor counts them (compared with the real processor in a child process)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from batchseg.config import RunConfig
from batchseg.engines.sam3 import engine
from batchseg.engines.sam3.prompts import check_prompts, count_tokens
from batchseg.errors import ConfigError, ModelLoadError

PROMPTS = [
    "roof",
    "solar panel",
    "Dachfläche 屋顶",
    "ROOF  Roofs!!",
    "  a  ",
    "swimming-pool, 3rd one",
    " ".join(["roof"] * 30),
    " ".join(["roof"] * 31),
    "x" * 80,
]

PROCESSOR_COUNTS = """
import json, sys
from transformers import Sam3Processor
processor = Sam3Processor.from_pretrained(sys.argv[1])
prompts = json.loads(sys.argv[2])
# What the engine compares with the limit: the processor's input_ids, padded to 32, never cut.
print(json.dumps([int(processor(text=p, return_tensors="pt")["input_ids"].shape[-1]) for p in prompts]))
"""


def test_tokens_are_counted_as_the_processor_counts_them(tiny_model: Path) -> None:
    # A child process: the test process is the parent of runs and never imports transformers.
    done = subprocess.run(
        [sys.executable, "-c", PROCESSOR_COUNTS, str(tiny_model), json.dumps(PROMPTS)],
        capture_output=True,
        text=True,
        check=True,
    )
    padded = json.loads(done.stdout.strip().splitlines()[-1])
    ours = count_tokens(tiny_model, PROMPTS)
    assert [max(n, 32) for n in ours] == padded
    assert ours[:2] == [3, 4] and ours[-3:] == [32, 33, 82]  # start and end tokens included


def test_too_long_a_prompt_is_refused_with_its_name_and_the_limit(tiny_model: Path) -> None:
    check_prompts(str(tiny_model), ["roof", " ".join(["roof"] * 30)])  # 32 tokens: at the limit
    long = " ".join(["roof"] * 31)
    shown = f'"{long[:76]}... ({len(long)} characters)'  # cut to one line of message
    with pytest.raises(
        ConfigError, match=rf"prompt {re.escape(shown)} is 33 tokens long .* at most 32: shorten it"
    ):
        check_prompts(str(tiny_model), ["roof", long])


def test_empty_prompts_are_refused(tiny_model: Path) -> None:
    with pytest.raises(ConfigError, match="empty"):
        check_prompts(str(tiny_model), ["roof", "  "])
    with pytest.raises(ConfigError, match="at least one prompt"):
        check_prompts(str(tiny_model), [])


def test_a_hub_id_or_a_folder_without_tokenizer_json_is_left_to_the_worker(
    tiny_model: Path, tmp_path: Path
) -> None:
    long = " ".join(["roof"] * 40)
    check_prompts("facebook/sam3", [long])
    check_prompts(str(tmp_path / "nope"), [long])
    partial = shutil.copytree(tiny_model, tmp_path / "partial")
    (partial / "tokenizer.json").unlink()
    check_prompts(str(partial), [long])


def test_an_unreadable_tokenizer_is_a_model_load_error(tiny_model: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(tiny_model, tmp_path / "broken")
    (broken / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ModelLoadError, match="cannot read the tokenizer"):
        check_prompts(str(broken), ["roof"])


def test_the_factory_modules_check_reads_the_run_config(tiny_model: Path, tmp_path: Path) -> None:
    config = RunConfig(input=tmp_path, prompts=("roof", "tree " * 40), model=str(tiny_model), output=tmp_path)
    with pytest.raises(ConfigError, match="tokens long"):
        engine.check(config)
    engine.check(config.with_changes(prompts=("roof",)))


def test_the_factory_module_and_its_check_leave_torch_out(tiny_model: Path) -> None:
    # The parent imports the factory module to call its check: neither may pull torch in.
    code = (
        "import sys\n"
        "from batchseg.engines.sam3 import engine, prompts\n"
        f"prompts.check_prompts({str(tiny_model)!r}, ['roof'])\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_too_long_prompt_ends_the_run_before_any_worker_starts(tiny_model: Path, tmp_path: Path) -> None:
    """Through the CLI: exit 1 naming the prompt and the limit, before anything is written (so no
    worker was started either: no model load)."""
    from click.testing import CliRunner
    from PIL import Image

    from batchseg.cli import cli

    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (32, 24), "gray").save(folder / "a.png")
    long = " ".join(["roof"] * 40)
    out = tmp_path / "out"
    args = ["run", str(folder), "--prompt", long, "--model", str(tiny_model), "--output", str(out)]
    result = CliRunner().invoke(cli, [*args, "--device", "cpu", "--tile", "off"])
    assert result.exit_code == 1, result.output
    assert "at most 32" in result.output and "roof roof" in result.output
    assert not out.exists()
