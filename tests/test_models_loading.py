"""Loading from folders and hub ids: frozen models, dtypes, clear errors when weights are missing offline."""

import json
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from sparsezip_pl.models import ModelNotAvailableError, load_backend
from sparsezip_pl.models.loading import DOWNLOAD_COMMAND
from sparsezip_pl.models.tiny import cached_tiny_llava


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("family", ["hf", "llava"])
def test_loaded_model_is_frozen_and_described(family):
    backend = load_backend(family, cached_tiny_llava(family, image_size=112), dtype="bfloat16")
    assert backend.family == family
    assert not backend.model.training
    assert all(not p.requires_grad for p in backend.model.parameters())
    assert backend.dtype == torch.bfloat16
    # The original code's stock loader leaves the tower in its checkpoint's dtype (float32 here).
    tower_dtype = torch.bfloat16 if family == "hf" else torch.float32
    assert next(backend.vision_tower.parameters()).dtype == tower_dtype
    assert type(backend.vision_tower).__name__ == "CLIPVisionModel"
    assert backend.feature_layer == -2 and backend.select_strategy == "default"
    assert (backend.vision_num_heads, backend.vision_head_dim, backend.vision_hidden_size) == (4, 16, 64)
    assert backend.text_hidden_size == 64
    assert backend.image_token_id == (-200 if family == "llava" else backend.tokenizer.convert_tokens_to_ids("<image>"))
    assert backend.embed_tokens(torch.tensor([[1, backend.image_token_id]])).shape == (1, 2, 64)


@pytest.mark.parametrize("family", ["hf", "llava"])
def test_offline_hub_id_not_in_cache_says_what_to_download(family, offline):
    repo = "sparsezip-tests/llava-not-downloaded"
    with pytest.raises(ModelNotAvailableError) as error:
        load_backend(family, repo)
    message = str(error.value)
    assert f"{DOWNLOAD_COMMAND} {repo}" in message
    assert "offline" in message and "--local-dir" in message


def test_the_download_command_named_in_errors_is_installed():
    """The command the offline errors tell users to run is a console script of the installed
    huggingface_hub (its 1.0 release removed ``huggingface-cli``, which these errors used to name)."""
    program, *arguments = DOWNLOAD_COMMAND.split()
    scripts = {script.name: script for script in entry_points(group="console_scripts")}
    assert program in scripts and scripts[program].dist.name == "huggingface_hub"
    executable = Path(sys.executable).parent / program  # installed beside this interpreter
    result = subprocess.run([str(executable), *arguments, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--local-dir" in result.stdout, result.stderr


def test_missing_folder_is_named():
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        load_backend("hf", "./no/such/llava-folder")


def test_llava_tower_missing_offline_names_the_tower(tmp_path, offline):
    folder = tmp_path / "llava-checkpoint"
    shutil.copytree(cached_tiny_llava("llava", image_size=112), folder)
    config = json.loads((folder / "config.json").read_text())
    config["mm_vision_tower"] = "openai/sparsezip-tests-missing-tower"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelNotAvailableError) as error:
        load_backend("llava", folder)
    message = str(error.value)
    assert f"{DOWNLOAD_COMMAND} openai/sparsezip-tests-missing-tower" in message
    assert "vision_tower=" in message
    # An explicit tower folder loads it.
    backend = load_backend("llava", folder, vision_tower=folder / "vision_tower")
    assert backend.vision_num_heads == 4
