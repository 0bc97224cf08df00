"""Our exports' tokenizers in OpenVLA's own stack: transformers 4.40.1 / tokenizers 0.19.1 / sentencepiece.

Builds that stack in a throwaway venv (pip, Python 3.11), writes three exports here and compares, prompt by prompt,
the input ids the reference stack gives (AutoTokenizer, plus the slow SentencePiece LlamaTokenizer where the
export has a tokenizer.model; BOS + prompt + 29871 as OpenVLA's predict_action builds them) with ours
(`VLAPolicy.prompt_ids` of the reloaded export):
- lookalike_lora_merged: a look-alike checkpoint with a LoRA adapter merged (tokenizer.json written by us);
- shipped_asset: assets/small-oft-libero-spatial-sft as shipped (the GRPO end is an adapter for it);
- sentencepiece_carried: a checkpoint whose only tokenizer file is a tokenizer.model (trained here in Llama-2's
  layout), exported after a LoRA merge: the export carries it verbatim and adds our tokenizer.json; the ids are
  also checked against SentencePiece's own encoding.
Writes bench/results/tokenizer_compat.json.

    .venv/bin/python -m bench.bench_tokenizer_compat
"""

import json
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import sentencepiece
import torch
import tyro

from tests.sentencepiece_writer import PROMPTS, write_llama_sentencepiece
from trainer.config import SHIPPED_SFT
from vla_actor import LoraSettings, load_policy, make_tiny_checkpoint
from vla_actor.checkpoint import ADDED_TOKENS, SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG, write_json
from vla_actor.policy import prompt_text

REFERENCE_STACK = ("transformers==4.40.1", "tokenizers==0.19.1", "sentencepiece==0.2.3", "protobuf")
# Runs inside the reference venv: reads {"directory", "prompts"} on stdin, prints {loader name: ids per prompt}.
REFERENCE_SCRIPT = """
import json, sys
import transformers, tokenizers
from transformers import AutoTokenizer, LlamaTokenizer
request = json.load(sys.stdin)
loaders = {"AutoTokenizer": lambda d: AutoTokenizer.from_pretrained(d)}
if request["has_sentencepiece_model"]:
    loaders["LlamaTokenizer (slow, sentencepiece)"] = lambda d: LlamaTokenizer.from_pretrained(d)
result = {"versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__}}
for name, load in loaders.items():
    tokenizer = load(request["directory"])
    ids = tokenizer(request["prompts"]).input_ids
    result[name] = {"class": type(tokenizer).__name__,
                    "ids": [row if row[-1] == 29871 else row + [29871] for row in ids]}
print(json.dumps(result))
"""


@dataclass
class Args:
    venv: str = "/tmp/tokenizer-compat-venv"
    """Reference venv; created with pip when missing."""
    out: str = "bench/results/tokenizer_compat.json"
    """Result file."""


def reference_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        interpreter = shutil.which("python3.11")
        if interpreter is None:
            sys.exit("bench_tokenizer_compat needs python3.11 on PATH to build OpenVLA's reference stack")
        subprocess.run([interpreter, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *REFERENCE_STACK], check=True)
    return python


def write_exports(root: Path) -> dict[str, Path]:
    lookalike = make_tiny_checkpoint(root / "lookalike", variant="openvla")
    policy = load_policy(lookalike)
    policy.apply_lora(LoraSettings(rank=4))
    exports = {"lookalike_lora_merged": policy.merge_and_export(root / "lookalike_export"),
               "shipped_asset": SHIPPED_SFT}
    source = shutil.copytree(lookalike, root / "sentencepiece_source")
    (source / "tokenizer.json").unlink()
    write_llama_sentencepiece(source / "tokenizer.model")
    for name, content in (("tokenizer_config.json", TOKENIZER_CONFIG), ("added_tokens.json", ADDED_TOKENS),
                          ("special_tokens_map.json", SPECIAL_TOKENS_MAP)):
        write_json(source / name, content)
    policy = load_policy(source)
    policy.apply_lora(LoraSettings(rank=4))
    exports["sentencepiece_carried"] = policy.merge_and_export(root / "sentencepiece_export")
    return exports


def main(args: Args) -> None:
    torch.set_num_threads(1)
    python = reference_python(Path(args.venv))
    instructions = [prompt.split("take to ")[-1].removesuffix("?\nOut:") for prompt in PROMPTS]
    prompts = [prompt_text(text) for text in instructions]
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for name, directory in write_exports(Path(root)).items():
            ours = load_policy(directory).prompt_ids(instructions)
            has_model = (directory / "tokenizer.model").is_file()
            request = {"directory": str(directory.resolve()), "prompts": prompts, "has_sentencepiece_model": has_model}
            answer = json.loads(subprocess.run([str(python), "-c", REFERENCE_SCRIPT], input=json.dumps(request),
                                               capture_output=True, text=True, check=True).stdout)
            versions = answer.pop("versions")
            entry = {"files": sorted(p.name for p in directory.iterdir() if not p.name.endswith(".safetensors")),
                     "reference_versions": versions}
            for loader, loaded in answer.items():
                matches = sum(a == b for a, b in zip(loaded["ids"], ours))
                entry[loader] = {"class": loaded["class"], "prompts": len(prompts), "equal_to_ours": matches}
            if has_model:
                reference = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
                expected = [[1] + reference.encode(prompt) + [29871] for prompt in prompts]
                entry["sentencepiece_encode"] = {"prompts": len(prompts),
                                                 "equal_to_ours": sum(a == b for a, b in zip(expected, ours))}
            results[name] = entry
            print(name, json.dumps(entry))
    record = {"reference_stack": list(REFERENCE_STACK), "python": platform.python_version(), "exports": results}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main(tyro.cli(Args))
