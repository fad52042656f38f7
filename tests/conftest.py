"""Tiny random models (GPT-2 Conv1D and Llama Linear) and a word-level tokenizer, built offline."""

from __future__ import annotations

import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SUBJECTS = ["Paris", "Rome", "Berlin", "Madrid", "Eiffel", "Tower", "Colosseum", "Danielle", "Darrieux", "Obama",
            "Toyota", "Apple", "Google", "Nile", "Amazon", "Everest", "Einstein", "Newton", "Curie", "Tesla"]
WORDS = ["the", "The", "is", "in", "of", "a", "located", "city", "capital", "language", "speaks", "born",
         "mother", "tongue", "French", "English", "Italian", "German", "Spanish", "Japan", "France", "Italy",
         "Germany", "Spain", "river", "mountain", "company", "scientist", "famous", "and", "was", "by", "to",
         "Therefore", "Because", "I", "You", "He", "She", "It", "In", "A", "This", ".", ",", "made", "works", "for"]
VOCAB = ["<unk>", "<pad>", "<eos>"] + sorted(set(SUBJECTS + WORDS))


def make_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def build_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(VOCAB), n_positions=64, n_embd=32, n_layer=4, n_head=4, initializer_range=0.2,
                        bos_token_id=2, eos_token_id=2, pad_token_id=1)
    return GPT2LMHeadModel(config).eval()


def build_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
                         bos_token_id=2, eos_token_id=2, pad_token_id=1, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


BUILDERS = {"gpt2": build_gpt2, "llama": build_llama}


def write_corpus(path, n_lines: int = 60, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        lines.append(" ".join(rng.choice(VOCAB[3:]) for _ in range(rng.randint(8, 14))))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture(params=sorted(BUILDERS))
def arch(request):
    return request.param
