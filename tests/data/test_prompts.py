from moerge.data.formats import MOERGE
from moerge.data.prompts import IGNORE_INDEX, answer_ids, encode_for_training, prompt_ids
from moerge.data.task import Example


def test_chat_template_prompt_and_answer(tiny_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    ex = Example("2+2=", "4")
    assert tok.decode(prompt_ids(tok, ex, MOERGE)).endswith("<|im_start|>assistant\n")
    assert tok.decode(answer_ids(tok, ex, "4", MOERGE)) == "4<|im_end|>"


def test_loss_covers_answer_only_and_truncates_prompt_start(tiny_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    ex = Example("x" * 200, "yes", ("yes", "no"))
    enc = encode_for_training(tok, ex, 64, MOERGE)
    assert len(enc.input_ids) == 64
    answer = [t for t in enc.labels if t != IGNORE_INDEX]
    assert tok.decode(answer) == "yes<|im_end|>"
    assert enc.labels[: 64 - len(answer)] == [IGNORE_INDEX] * (64 - len(answer))


def test_without_chat_template_uses_plain_prompt(tmp_path):
    from helpers import make_tokenizer

    tok = make_tokenizer(chat_template=False)
    ex = Example("Q?", "A")
    assert tok.decode(prompt_ids(tok, ex, MOERGE)).endswith("Answer:")
    assert answer_ids(tok, ex, "A", MOERGE)[-1] == tok.eos_token_id
