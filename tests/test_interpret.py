"""Nearest vocabulary words of learned context vectors (CoOp's interpretation table)."""

from __future__ import annotations

import pytest
import torch

from vlprompt.backbone.tokenizer import get_tokenizer
from vlprompt.errors import ConfigError
from vlprompt.prediction.interpret import context_vectors, format_neighbours, nearest_words
from vlprompt.methods.coop import CoOp, CoOpConfig
from vlprompt.methods.zeroshot import ZeroShot


def test_vectors_equal_to_word_embeddings_map_back_at_distance_zero(clip):
    tokenizer = get_tokenizer()
    ids = tokenizer.encode("a photo of a texture")
    table = clip.token_embedding.weight.detach()
    rows = nearest_words(table[ids], clip, tokenizer, k=3)
    assert [row[0].word for row in rows] == ["a", "photo", "of", "a", "texture"]
    assert [row[0].token_id for row in rows] == ids
    assert all(row[0].distance == 0.0 for row in rows)
    for row, index in zip(rows, ids, strict=True):
        distances = [n.distance for n in row]
        assert distances == sorted(distances) and distances[1] > 0
        expected = (table - table[index]).norm(dim=1)
        expected[index] = float("inf")
        assert row[1].distance == pytest.approx(expected.min().item(), rel=1e-5)


def test_untrained_coop_from_a_phrase_reads_as_the_phrase(clip):
    coop = CoOp(clip, ["cat"], CoOpConfig(ctx_init="a photo of a"))
    rows = nearest_words(context_vectors(coop), clip, k=1)
    assert [(row[0].word, row[0].distance) for row in rows] == [("a", 0.0), ("photo", 0.0), ("of", 0.0), ("a", 0.0)]
    word, distance, _ = rows[1][0]  # a neighbour unpacks as (word, distance, token_id)
    assert (word, distance) == ("photo", 0.0)


def test_class_specific_context_gives_one_list_per_class(clip):
    table = clip.token_embedding.weight.detach()
    ids = get_tokenizer().encode("red green blue yellow")
    ctx = torch.stack([table[ids[:2]], table[ids[2:]] + 1e-3])  # [K=2, M=2, width]
    rows = nearest_words(ctx, clip, k=2)
    assert len(rows) == 2 and all(len(per_class) == 2 for per_class in rows)
    assert [[n[0].word for n in per_class] for per_class in rows] == [["red", "green"], ["blue", "yellow"]]
    assert rows[1][0][0].distance == pytest.approx(1e-3 * clip.config.transformer_width ** 0.5, rel=1e-3)


def test_words_are_readable_and_the_table_formats(clip):
    ids = get_tokenizer().encode("photograph")
    rows = nearest_words(clip.token_embedding.weight[ids].detach(), clip, k=2)
    assert all("</w>" not in n.word for row in rows for n in row)
    text = format_neighbours(rows, title="unified context")
    assert text.splitlines()[0] == "unified context"
    assert text.splitlines()[1].startswith("#1   ") and "(0.0000)" in text


def test_bad_input(clip):
    with pytest.raises(ConfigError, match="width"):
        nearest_words(torch.zeros(2, 7), clip)
    with pytest.raises(ConfigError, match="shape"):
        nearest_words(torch.zeros(clip.config.transformer_width), clip)
    with pytest.raises(ConfigError, match="k must be"):
        nearest_words(torch.zeros(1, clip.config.transformer_width), clip, k=0)
    with pytest.raises(ConfigError, match="no learned context"):
        context_vectors(ZeroShot(clip, ["cat"]))
