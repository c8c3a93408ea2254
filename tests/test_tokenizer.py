"""The byte-level BPE: special-token ids, lossless round trip, determinism and the identity check.

Run: .venv/bin/python -m pytest -q tests/test_tokenizer.py  (CPU, a few seconds; trains throwaway tokenizers)
"""

import pytest

from model.config import AUDIO_ID, BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, SPECIAL_TOKENS, VIDEO_ID
from tokenizer.bpe import check_tokenizer, load_tokenizer, save_tokenizer, tokenizer_digest, train_bpe
from train.cli import main as cli

TEXTS = ["the red circle is in the top left.", "A quiet high tone. 3 plus 4 is 7.", "<|image|>Question: what colour? red"] * 50
HARD = ["", " ", "héllo wörld ñ", "中文 日本語 한국어", "emoji 🤖🎉 and zwj 👩‍💻", "tabs\tand\nnew lines\r\n",
        "  leading and trailing  ", "<|image_start|><|image|><|image_end|> text", "\x00\x01 control", "<|not_special|>"]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXTS, 300)


def test_special_tokens_take_the_model_ids_in_order(tok):
    assert [tok.id_to_token(i) for i in range(len(SPECIAL_TOKENS))] == list(SPECIAL_TOKENS)
    assert (PAD_ID, BOS_ID, EOS_ID) == tuple(tok.token_to_id(t) for t in ("<|pad|>", "<|bos|>", "<|eos|>"))
    ids = tok.encode("<|image|><|video|><|audio|> a<|image|>b").ids
    assert ids[:3] == [IMAGE_ID, VIDEO_ID, AUDIO_ID] and ids.count(IMAGE_ID) == 2  # never split into bytes
    assert all(tok.id_to_token(i) not in SPECIAL_TOKENS for i in tok.encode("image video audio <|imag").ids)


@pytest.mark.parametrize("text", HARD)
def test_round_trip_is_lossless(tok, text):
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_vocabulary_is_learned_here(tok):
    vocab = tok.get_vocab()
    assert len(vocab) == 300  # specials + all 256 bytes + merges learned from TEXTS only
    learned = [i for i in vocab.values() if i >= len(SPECIAL_TOKENS) + 256]
    corpus = "".join(TEXTS)
    assert learned and all(tok.decode([i]) in corpus for i in learned)  # every merge comes from our corpus
    with pytest.raises(ValueError, match="too small"):
        train_bpe(TEXTS, 100)


def test_same_corpus_same_bytes_and_a_different_tokenizer_is_refused(tmp_path):
    a = save_tokenizer(train_bpe(TEXTS, 300), tmp_path / "a")
    b = save_tokenizer(train_bpe(TEXTS, 300), tmp_path / "b")
    c = save_tokenizer(train_bpe(TEXTS, 290), tmp_path / "c")
    assert a.read_bytes() == b.read_bytes() and tokenizer_digest(a) == tokenizer_digest(tmp_path / "a")
    check_tokenizer(b, tokenizer_digest(a))  # identical identity: accepted
    with pytest.raises(ValueError, match=r"trained with sha256 .*use the tokenizer.json saved with the checkpoint"):
        check_tokenizer(c, tokenizer_digest(a))
    assert load_tokenizer(tmp_path / "a").encode("red").ids == train_bpe(TEXTS, 300).encode("red").ids


def test_cli_trains_on_a_generated_corpus(tmp_path):
    from train.data.corpus import generate

    generate(tmp_path / "corpus", seed=0, sizes={"train": 60, "heldout": 10}, shard_rows=60)
    args = ["--corpus", str(tmp_path / "corpus"), "--vocab-size", "500", "--out", str(tmp_path / "tok")]
    assert cli(["tokenizer", "train", *args]) == 0
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.token_to_id("<|audio_end|>") == len(SPECIAL_TOKENS) - 1 and "Question" in tok.decode(tok.encode("Question").ids)
