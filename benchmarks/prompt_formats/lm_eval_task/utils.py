"""doc_to_* hooks for the lm-eval task `prompt_formats_plain`: the "plain" format rendered as text.

doc_to_text = the chat-template prompt as TEXT (user turn = input only, default system message,
generation prompt); target_delimiter is "" and each choice ends with <|im_end|>, so context +
continuation tokenizes to exactly prompt ids + answer ids of the plain format.
"""

import os
from functools import lru_cache

MODEL = os.environ.get("PF_MODEL_DIR", "/root/.cache/moerge/models/smollm2-135m-instruct")
EOS = "<|im_end|>"


@lru_cache(maxsize=1)
def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


def process_docs(dataset):
    return dataset.filter(lambda doc: doc["split"] == "test")


def doc_to_text(doc):
    messages = [{"role": "user", "content": doc["input"]}]
    return _tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def doc_to_choice(doc):
    return [choice + EOS for choice in doc["choices"]]


def doc_to_target(doc):
    return doc["choices"].index(doc["target"])
