"""Answers are scored as they are tokenised after their prompt, also with legacy SentencePiece tokenizers."""

import pytest
import torch
from conftest import build_llama, make_tokenizer
from tokenizers import Tokenizer, decoders, models, normalizers
from tokenizers.processors import TemplateProcessing
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from alphaedit_plugin.evaluation.scoring import answer_nll
from alphaedit_plugin.tracing import encode, prompt_and_answer_ids

PROMPT = "The capital of France is"
PIECES = ["<unk>", "<pad>", "<s>", "▁The", "▁capital", "▁of", "▁France", "▁is", "▁Paris", "▁Rome", "▁",
          "P", "a", "r", "i", "s", "R", "o", "m", "e"]


def legacy_sentencepiece(extra_pieces=()):
    """Llama-2-style: "▁" prepended and spaces replaced by the normaliser, a Unigram model, a BOS token.

    Alone, " Paris" becomes "▁" "▁Paris"; after the prompt it is the single token "▁Paris".
    """
    pieces = PIECES + list(extra_pieces)
    scores = [(p, -1.0 if p.startswith("▁") and len(p) > 1 else -5.0) for p in pieces]
    backend = Tokenizer(models.Unigram(scores, unk_id=0))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>")


def test_legacy_sentencepiece_answer_keeps_one_token():
    tok = legacy_sentencepiece()
    alone = tok.convert_ids_to_tokens(encode(tok, " Paris", special_tokens=False))
    assert alone == ["▁", "▁Paris"]  # the defect this guards against
    prompt_ids, answer_ids = prompt_and_answer_ids(tok, PROMPT, "Paris")
    assert tok.convert_ids_to_tokens(answer_ids) == ["▁Paris"]
    assert prompt_ids == encode(tok, PROMPT)  # BOS and the prompt's own tokens
    assert prompt_ids + answer_ids == encode(tok, PROMPT + " Paris")


def test_a_token_across_the_boundary_falls_back_to_separate_tokenisation():
    tok = legacy_sentencepiece(extra_pieces=["▁is▁Paris"])
    joint = tok.convert_ids_to_tokens(encode(tok, PROMPT + " Paris"))
    assert "▁is▁Paris" in joint  # the joint text has no token boundary at the prompt's end
    assert prompt_and_answer_ids(tok, PROMPT, "Paris") == (encode(tok, PROMPT),
                                                           encode(tok, " Paris", special_tokens=False))


@pytest.mark.parametrize("answer", ["Paris", " Paris", "Rome"])
def test_word_level_and_byte_level_tokenizers_are_unchanged(answer):
    from tokenizers import pre_tokenizers, trainers

    word_level = make_tokenizer()
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([PROMPT + " Paris", PROMPT + " Rome"] * 5,
                                trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<pad>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    byte_level = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")
    for tok in (word_level, byte_level):
        spaced = answer if answer.startswith(" ") else " " + answer
        assert prompt_and_answer_ids(tok, PROMPT, answer) == (encode(tok, PROMPT),
                                                              encode(tok, spaced, special_tokens=False))


def test_answer_nll_scores_the_jointly_tokenised_answer():
    tok = legacy_sentencepiece()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(PIECES), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=32, bos_token_id=2, pad_token_id=1)).eval()
    ids = encode(tok, PROMPT + " Paris")
    with torch.no_grad():
        log_probs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = -float(log_probs[len(ids) - 2, ids[-1]])  # one answer token, predicted from the prompt's end
    assert answer_nll(model, tok, [(PROMPT, "Paris")])[0] == pytest.approx(expected, rel=1e-5)


def test_tiny_llama_scores_are_unchanged_for_the_test_tokenizer():
    """The suite's word-level tokenizer has no joint-vs-separate difference: scores equal the old split."""
    model, tok = build_llama(), make_tokenizer()
    prompt, answer = "The capital of France", "Rome"
    ids = encode(tok, prompt) + encode(tok, " " + answer, special_tokens=False)
    with torch.no_grad():
        log_probs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = -float(log_probs[len(ids) - 2, ids[-1]])
    assert answer_nll(model, tok, [(prompt, answer)])[0] == pytest.approx(expected, rel=1e-5)
