"""Token text in the Tokens screen: decoded with the tokenizer the manifest names when it loads from local files,
bytes for byte-level traces and ⟨id⟩ otherwise; the probe stores the tokenizer's name in the manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moeprobe.traces import ShardWriter, prepare_trace_dir
from moeprobe.tui.app import MoeprobeApp
from moeprobe.tui.decoding import load_decoder, tokenizer_file
from moeprobe.tui.screens.tokens import TokensScreen
from moeprobe.tui.widgets.tokentext import TokenText
from tests.support import layer_meta, routing_table
from tests.tui.helpers import open_screen, text_of

tokenizers = pytest.importorskip("tokenizers")

WORDS = ["[UNK]", "the", "router", "picks", "experts", "\n"]


def _tokenizer_dir(root: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins pieces; a single id decodes to its word
    root.mkdir(parents=True)
    tok.save(str(root / "tokenizer.json"))
    return root


def _trace(path: Path, ids: list[int], tokenizer: str | None) -> Path:
    prepare_trace_dir(path, force=True)
    model = {"name": "hand-made", "family": "test", "tokenizer": tokenizer}
    writer = ShardWriter(path, model=model, layers=layer_meta(1, 4, 1), options={})
    n = len(ids)
    writer.append("routing", routing_table(np.arange(n)[:, None] % 4, token_id=np.array(ids), position=np.arange(n)))
    writer.flush()
    writer.close()
    return path


def test_decoder_from_a_directory_and_from_the_local_cache_only(tmp_path: Path) -> None:
    directory = _tokenizer_dir(tmp_path / "tok")
    decode = load_decoder(str(directory))
    assert decode is not None and [decode(i) for i in (1, 2, 3)] == ["the", "router", "picks"]
    assert decode(99) == "⟨99⟩"
    # A repo id resolves through the Hugging Face cache layout, never the network.
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer.json").write_bytes((directory / "tokenizer.json").read_bytes())
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("abc123")
    assert tokenizer_file("org/tiny", cache_dir=cache) == snapshot / "tokenizer.json"
    assert tokenizer_file("org/not-cached", cache_dir=cache) is None
    assert load_decoder(str(tmp_path / "no-such-dir")) is None


async def test_tokens_screen_decodes_with_the_manifest_tokenizer(tmp_path: Path) -> None:
    directory = _tokenizer_dir(tmp_path / "tok")
    path = _trace(tmp_path / "words", [1, 2, 3, 4], str(directory))
    app = MoeprobeApp([path])
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_screen(pilot, "4", TokensScreen)
        assert [c.text for c in screen.query_one(TokenText).cells] == ["the", "router", "picks", "experts"]
        assert "token 'experts'  id 4" in text_of(screen.query_one("#detail"))


async def test_without_a_loadable_tokenizer_ids_are_shown(tmp_path: Path) -> None:
    path = _trace(tmp_path / "ids", [1000, 1001], "org/model-not-on-this-machine")
    app = MoeprobeApp([path])
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_screen(pilot, "4", TokensScreen)
        assert [c.text for c in screen.query_one(TokenText).cells] == ["⟨1000⟩", "⟨1001⟩"]


def test_probe_stores_the_tokenizer_name(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import moeprobe
    from tests.tiny_models import build

    model = build("mixtral")
    ids = torch.randint(3, 96, (1, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), moeprobe.record(model, tmp_path / "built"):
        model(ids)
    assert moeprobe.open_trace(tmp_path / "built").manifest["model"]["tokenizer"] is None  # built from a config
    model.config._name_or_path = "org/tiny-mixtral"  # what from_pretrained sets
    with torch.no_grad(), moeprobe.record(model, tmp_path / "named"):
        model(ids)
    assert moeprobe.open_trace(tmp_path / "named").manifest["model"]["tokenizer"] == "org/tiny-mixtral"
