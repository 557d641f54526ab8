"""Chat templates that stop (engine/chat_templates.py): each named format renders its published text, masks what
the assistant writes as our SFTTrainer trains it, translates to an Ollama template that builds the same prompt,
grows a model that lacks its tokens, and registers its end-of-turn token as EOS everywhere, so that a tiny model
fine-tuned in each format stops by itself in the engine and in llama.cpp."""

from __future__ import annotations

import importlib.util
import math
import re
import warnings
from pathlib import Path

import llama_cpp
import pytest
import torch
import transformers
from gguf import GGUFReader
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import engine
from engine import FastModel, get_chat_template
from engine.chat_templates import (
    CHAT_TEMPLATES,
    chat_template_for,
    detect_chat_template,
    resize_token_embeddings,
    without_generation_markers,
)
from engine.errors import ConfigurationError
from engine.gguf.modelfile import detect_chat_family, modelfile_text
from engine.models.families import FAMILIES
from engine.training.sft_data import tokenize_sft_dataset

NAMES = list(CHAT_TEMPLATES)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]
QWEN_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"

#: name -> (BOS of the real models, CONVERSATION with the generation prompt, its first two turns without it).
#: Written from the published formats (Meta, Google, Microsoft, Mistral and Qwen model cards / tokenizer configs).
PUBLISHED = {
    "chatml": (
        None,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n",
    ),
    "qwen": (
        None,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
        QWEN_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n",
    ),
    "llama-3": (
        "<|begin_of_text|>",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        "Hello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>",
    ),
    "gemma": (
        "<bos>",
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n",
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n",
    ),
    "phi-3": (
        None,
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"
        "<|user|>\nBye<|end|>\n<|assistant|>\n",
        "<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n",
    ),
    "mistral": (
        "<s>",
        "<s>[INST] Be brief.\n\nHi[/INST] Hello!</s>[INST] Bye[/INST]",
        "<s>[INST] Hi[/INST] Hello!</s>",
    ),
}


def base_tokenizer(bos: str | None = "<s>", corpus: tuple[str, ...] = ()) -> transformers.PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer as a base model ships it: no chat tokens, EOS ``<|endoftext|>``.

    Its merges are learnt from lowercase words only, so llama.cpp's default BPE pre-tokenizer splits text into
    the same pieces as the GPT-2 regex (the tests check that llama.cpp tokenizes the prompts identically).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>"] + ([bos] if bos else [])
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = " ".join(corpus) or "hello hi there friend how are you fine thanks be brief"
    tok.train_from_iterator([words] * 3, trainer)
    kwargs = {"bos_token": bos} if bos else {}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", **kwargs
    )


def render(name: str, messages, add_generation_prompt: bool, bos: str | None = None) -> str:
    tok = base_tokenizer(bos)
    tok.chat_template = CHAT_TEMPLATES[name].jinja
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


# ---------------------------------------------------------------------------------------------- declarations


def test_names_aliases_and_unknown_names():
    assert NAMES == ["chatml", "qwen", "llama-3", "gemma", "phi-3", "mistral"]
    assert chat_template_for("Llama3").name == "llama-3" and chat_template_for("phi3").name == "phi-3"
    assert chat_template_for("qwen2.5").name == "qwen"
    with pytest.raises(ConfigurationError, match="Valid names: chatml, qwen, llama-3, gemma, phi-3, mistral"):
        chat_template_for("vicuna")
    with pytest.raises(ConfigurationError, match="unknown chat template 'vicuna'"):
        get_chat_template(base_tokenizer(), "vicuna")
    for t in CHAT_TEMPLATES.values():
        assert t.end_of_turn in t.special_tokens and t.stop[0] == t.end_of_turn, t.name
        assert detect_chat_template(t.jinja) == t.name
    assert engine.get_chat_template is get_chat_template and "get_chat_template" in engine.__all__


def test_families_declare_their_template(full_tokenizer):
    declared = {f.name: f.chat_template for f in FAMILIES}
    assert {k: declared[k] for k in ("llama", "mistral", "qwen2", "qwen3")} == {
        "llama": "llama-3", "mistral": "mistral", "qwen2": "qwen", "qwen3": "chatml"}
    for family in FAMILIES:
        if family.chat_template is not None:
            tok = get_chat_template(full_tokenizer, family.chat_template)
            assert detect_chat_template(tok.chat_template) == family.chat_template


@pytest.mark.parametrize("name", NAMES)
def test_renders_the_published_format(name):
    """transformers renders the published text; so does llama-cpp-python from the GGUF form of the template."""
    bos, with_prompt, first_turns = PUBLISHED[name]
    assert render(name, CONVERSATION, True, bos) == with_prompt
    assert render(name, CONVERSATION[1:3], False, bos) == first_turns
    # add_generation_prompt adds the assistant header (nothing for Mistral: the prompt ends at [/INST]).
    header = render(name, CONVERSATION[1:2], True, bos)[len(render(name, CONVERSATION[1:2], False, bos)):]
    assert header == {"chatml": "<|im_start|>assistant\n", "qwen": "<|im_start|>assistant\n",
                      "llama-3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                      "gemma": "<start_of_turn>model\n", "phi-3": "<|assistant|>\n", "mistral": ""}[name]
    stored = without_generation_markers(CHAT_TEMPLATES[name].jinja)
    assert not re.search(r"\{%-?\s*(end)?generation", stored)
    for template in (stored, CHAT_TEMPLATES[name].jinja):
        formatter = Jinja2ChatFormatter(template=template, eos_token="<|endoftext|>", bos_token=bos or "")
        assert formatter(messages=CONVERSATION).prompt == with_prompt


#: The chat templates TRL ships (copies of the models' own), located without importing trl.
TRL_TEMPLATES = Path(importlib.util.find_spec("trl").origin).parent / "chat_templates"


@pytest.mark.parametrize(("file", "name"), [("llama3.jinja", "llama-3"), ("gemma.jinja", "gemma"),
                                            ("phi3.jinja", "phi-3"), ("qwen2_5.jinja", "qwen"),
                                            ("qwen3.jinja", "chatml")])
def test_real_models_templates_are_recognised_and_agree(file, name):
    """The models' own templates (as TRL ships copies of them) map to our names, and render the same prompt for a
    conversation they support (user / assistant turns, generation prompt)."""
    theirs = (TRL_TEMPLATES / file).read_text()
    assert detect_chat_template(theirs) == detect_chat_family(theirs) == name
    bos = {"llama-3": "<|begin_of_text|>", "gemma": "<bos>"}.get(name)
    tok = base_tokenizer(bos)
    tok.chat_template = theirs
    expected = tok.apply_chat_template(CONVERSATION[1:], tokenize=False, add_generation_prompt=True)
    assert render(name, CONVERSATION[1:], True, bos) == expected


def test_detects_named_and_unknown_templates():
    """(SmolLM2's own template is recognised as ChatML in tests/export/test_gguf_export.py's Modelfile test.)"""
    assert detect_chat_template({"default": CHAT_TEMPLATES["gemma"].jinja}) == "gemma"
    assert detect_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}") is None
    assert detect_chat_template(None) is None


def test_generation_markers_are_replaced_with_equivalent_blocks():
    text = "a{%- generation %}b{% endgeneration -%} c{%generation%}d{%endgeneration%}"
    assert without_generation_markers(text) == "a{%- if true %}b{% endif -%} c{% if true %}d{% endif %}"
    # Plain Jinja (no transformers extension) refuses the markers and parses the stored form.
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    with pytest.raises(jinja2.TemplateSyntaxError, match="generation"):
        env.from_string(CHAT_TEMPLATES["chatml"].jinja)
    env.from_string(without_generation_markers(CHAT_TEMPLATES["chatml"].jinja))


# ---------------------------------------------------------------------------------------------- assistant masks


@pytest.fixture(scope="module")
def full_tokenizer():
    """The base tokenizer with every template's special tokens (so no model is needed to set a template)."""
    tok = base_tokenizer()
    tokens = sorted({t for c in CHAT_TEMPLATES.values() for t in c.special_tokens})
    tok.add_special_tokens({"extra_special_tokens": tokens}, replace_extra_special_tokens=False)
    return tok


@pytest.mark.parametrize("name", NAMES)
def test_generation_masks_equal_the_sft_trainers_labels(full_tokenizer, name):
    """``{% generation %}`` marks exactly the tokens our SFTTrainer trains with assistant_only_loss: each reply and its
    end-of-turn token, not the assistant header nor the newline after the end of turn."""
    tok = get_chat_template(full_tokenizer, name)  # every token present: no model needed
    conversation = [*CONVERSATION, {"role": "assistant", "content": "See you."}]
    out = tok.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    (row,) = tokenize_sft_dataset([{"messages": conversation}], tok, max_length=None, assistant_only_loss=True)
    assert row["input_ids"] == out["input_ids"]
    assert [int(label != -100) for label in row["labels"]] == out["assistant_masks"]
    eot = CHAT_TEMPLATES[name].end_of_turn
    space = " " if name == "mistral" else ""
    trained = tok.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert trained == f"{space}Hello!{eot}{space}See you.{eot}"


# ---------------------------------------------------------------------------------------------- Ollama


def _parse_go(template: str) -> list:
    """The Go-template subset the Ollama templates use (text, ``{{ .Field }}``, ``{{ if .F }}..{{ else }}..{{ end }}``)
    as a tree: ``("text", s)``, ``("field", name)``, ``["if", name, body, else_body]``."""
    root: list = []
    stack, ifs, pos = [root], [], 0
    for m in re.finditer(r"\{\{(.*?)\}\}", template, re.S):
        if m.start() > pos:
            stack[-1].append(("text", template[pos : m.start()]))
        pos = m.end()
        action = m.group(1).strip()
        assert not action.startswith("-") and not action.endswith("-"), "trim markers are not emulated"
        if action.startswith("if ."):
            node = ["if", action[4:], [], []]
            stack[-1].append(node)
            stack.append(node[2])
            ifs.append(node)
        elif action == "else":
            stack[-1] = ifs[-1][3]
        elif action == "end":
            stack.pop()
            ifs.pop()
        else:
            assert action.startswith("."), action
            stack[-1].append(("field", action[1:]))
    if pos < len(template):
        root.append(("text", template[pos:]))
    assert len(stack) == 1, "unbalanced template"
    return root


def _execute(nodes: list, values: dict) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "field":
            out.append(values[node[1]])
        else:
            out.append(_execute(node[2] if values[node[1]] else node[3], values))
    return "".join(out)


def _cut_at_response(nodes: list) -> list:
    """Ollama's ``deleteNode``: drop the first ``.Response`` field and every node after it (depth first)."""
    cut = False

    def walk(nodes):
        nonlocal cut
        kept = []
        for node in nodes:
            if cut:
                continue
            if node[0] == "field" and node[1] == "Response":
                cut = True
            elif node[0] == "if":
                kept.append(["if", node[1], walk(node[2]), walk(node[3])])
            else:
                kept.append(node)
        return kept

    return walk(nodes)


def ollama_prompt(template: str, messages: list[dict], default_system: str | None = None) -> str:
    """The prompt Ollama builds from a legacy (``.System``/``.Prompt``/``.Response``) template: the template once per
    exchange, the last one cut at ``.Response`` (ollama/template/template.go ``Execute``); the Modelfile's ``SYSTEM``
    comes first when the request has no system message."""
    if default_system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": default_system}, *messages]
    tree = _parse_go(template)
    values = {"System": "", "Prompt": "", "Response": ""}
    out = []
    for m in messages:
        key = {"system": "System", "user": "Prompt", "assistant": "Response"}[m["role"]]
        if (key == "System" and (values["Prompt"] or values["Response"])) or (key == "Prompt" and values["Response"]):
            out.append(_execute(tree, values))
            values = {"System": "", "Prompt": "", "Response": ""}
        values[key] = m["content"]
    out.append(_execute(_cut_at_response(tree), values))
    return "".join(out)


def test_ollama_emulation_follows_ollama():
    """The emulator itself, on the Llama 3 template of Ollama's docs style: cut after the last .Response."""
    template = "{{ if .System }}S:{{ .System }};{{ end }}U:{{ .Prompt }};A:{{ .Response }};END\n"
    msgs = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}, {"role": "user", "content": "3"}]
    assert ollama_prompt(template, msgs, "sys") == "S:sys;U:1;A:2;END\nU:3;A:"


@pytest.mark.parametrize("name", NAMES)
def test_ollama_template_builds_the_same_prompt(name):
    """Ollama's prompt from the Modelfile's TEMPLATE (and SYSTEM) equals the Jinja prompt, BOS aside (llama.cpp adds
    it from the GGUF file), for single and multi-turn conversations with and without a system message."""
    declared = CHAT_TEMPLATES[name]
    tok = base_tokenizer(bos=None)
    tok.chat_template = declared.jinja
    for messages in (CONVERSATION[1:2], CONVERSATION[:2], CONVERSATION[1:], CONVERSATION):
        expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ollama_prompt(declared.ollama, messages, declared.default_system) == expected, messages


@pytest.mark.parametrize("name", NAMES)
def test_modelfile_comes_from_the_declaration(full_tokenizer, name):
    tok = get_chat_template(full_tokenizer, name)
    text = modelfile_text("m.gguf", tok)
    declared = CHAT_TEMPLATES[name]
    assert f'TEMPLATE """{declared.ollama}"""' in text
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
    assert stops == list(declared.stop)  # the end-of-turn token first; the EOS is that token
    assert ('SYSTEM """You are Qwen' in text) == (name == "qwen")
    if name == "qwen":  # the example of docs/chat_templates.md
        assert text == (
            'FROM ./m.gguf\n\nTEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
            "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
            '{{ .Response }}<|im_end|>\n"""\n\nSYSTEM """You are Qwen, created by Alibaba Cloud. You are a helpful '
            'assistant."""\n\nPARAMETER stop "<|im_end|>"\nPARAMETER stop "<|im_start|>"\n'
        )


# ---------------------------------------------------------------------------------------------- growing the model


@pytest.fixture(scope="module")
def base_folders(tmp_path_factory):
    """Tiny random Llamas (tied and untied embeddings) saved with the base tokenizer, as a base model ships."""
    root = tmp_path_factory.mktemp("chat_base")
    tok = base_tokenizer()
    folders = {}
    for tied in (True, False):
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
        folder = root / ("tied" if tied else "untied")
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        tok.save_pretrained(folder)
        folders[tied] = folder
    return folders


def load(folder):
    return FastModel.from_pretrained(str(folder), dtype="float32", max_seq_length=256, verbose=False)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_missing_tokens_grow_the_model(base_folders, tmp_path, tied):
    model, tok = load(base_folders[tied])
    old_size = model.args.vocab_size
    old_embed = model.model.embed_tokens.weight.detach().clone()
    old_head = model.lm_head.weight.detach().clone()
    eos_before = model.args.eos_token_id

    tok = get_chat_template(tok, "llama-3", model=model)
    new_size = old_size + 3
    assert len(tok) == new_size and model.args.vocab_size == model.hf_config.vocab_size == new_size
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert embed.shape == head.shape == (new_size, 64) and model.model.embed_tokens.num_embeddings == new_size
    assert (head is embed) == tied and model.lm_head.out_features == new_size
    torch.testing.assert_close(embed[:old_size], old_embed, rtol=0, atol=0)
    torch.testing.assert_close(head[:old_size], old_head, rtol=0, atol=0)
    for row in range(old_size, new_size):  # new rows: the mean of the old ones
        torch.testing.assert_close(embed[row], old_embed.mean(0))
        torch.testing.assert_close(head[row], old_head.mean(0))
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert eot == tok.eos_token_id and tok.eos_token == "<|eot_id|>"
    assert model.args.eos_token_id == model.hf_config.eos_token_id == [eot, eos_before]

    # Forward, loss and gradients reach the new rows; generation runs.
    text = tok.apply_chat_template(CONVERSATION[1:3], tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    assert int(ids.max()) >= old_size
    model.train()
    out = model(ids, labels=ids, return_logits=True)
    assert out.logits.shape == (1, ids.shape[1], new_size)
    out.loss.backward()
    assert float(embed.grad[old_size:].abs().sum()) > 0
    model.eval()
    assert model.generate(ids[:, :5], max_new_tokens=3).shape[1] <= 8

    # The grown model saves and loads in transformers with the same logits.
    model.save_pretrained_merged(tmp_path / "merged", tok, save_method="merged_32bit")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert hf.config.vocab_size == new_size and hf.config.eos_token_id == [eot, eos_before]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_missing_tokens_without_a_model_raise_and_change_nothing(base_folders):
    tok = transformers.AutoTokenizer.from_pretrained(base_folders[True])
    size, eos = len(tok), tok.eos_token
    expected = r"pass the model.*get_chat_template\(tokenizer, 'chatml', model=model\)"
    with pytest.raises(ConfigurationError, match=expected):
        get_chat_template(tok, "chatml")
    assert len(tok) == size and tok.eos_token == eos and tok.chat_template is None


def test_tokens_inside_a_padded_vocabulary_reuse_rows(base_folders):
    """A model with more rows than tokens (Qwen pads its vocabulary): the new tokens take rows already there, which
    start as the mean of the others; the matrix keeps its size."""
    model, tok = load(base_folders[False])
    resize_token_embeddings(model, len(tok) + 8)
    model.model.embed_tokens.weight.data[len(tok):] = 7.0  # untrained padding rows
    padded = model.args.vocab_size
    get_chat_template(tok, "chatml", model=model)
    assert model.args.vocab_size == padded and len(tok) == padded - 6
    embed = model.model.embed_tokens.weight
    for token in ("<|im_start|>", "<|im_end|>"):
        row = tok.convert_tokens_to_ids(token)
        others = [i for i in range(padded) if i not in (row, tok.convert_tokens_to_ids("<|im_start|>"),
                                                         tok.convert_tokens_to_ids("<|im_end|>"))]
        torch.testing.assert_close(embed[row], embed[others].mean(0))
    with pytest.raises(ConfigurationError, match="cannot shrink"):
        resize_token_embeddings(model, 10)


# ---------------------------------------------------------------------------------------------- it stops

REPLIES = [
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there friend"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "how are you"},
     {"role": "assistant", "content": "fine thanks"}],
]


@pytest.fixture()
def one_thread():
    """Tiny matrices: one thread is 10x faster than two fighting over a loaded 2-core machine (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fine_tune(model, tok, max_steps: int = 200) -> int:
    """Full fine-tuning on REPLIES (assistant turns only, as SFTTrainer tokenizes them) until every trained token,
    end-of-turn included, has probability > 0.9 under teacher forcing; returns the number of steps."""
    rows = tokenize_sft_dataset([{"messages": c} for c in REPLIES], tok, max_length=256, assistant_only_loss=True)
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [tok.pad_token_id] * (length - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [-100] * (length - len(r["labels"])) for r in rows])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (length - len(r["input_ids"])) for r in rows])
    trained = int((labels[:, 1:] != -100).sum())
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    model.train()
    for step in range(1, max_steps + 1):
        loss = model(ids, attention_mask=mask, labels=labels).loss
        if float(loss.detach()) * trained < -math.log(0.9):  # the summed NLL bounds every token's
            break
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return step


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_fine_tuned_model_stops_in_the_engine_and_in_llama_cpp(base_folders, tmp_path, one_thread, name):
    """A base model + base tokenizer, given the template with get_chat_template and fine-tuned on two replies, ends
    each reply with the end-of-turn token by itself: ``generate`` (default EOS) stops there, and llama.cpp, running
    the exported f16 GGUF with the GGUF's own chat template, stops there with finish_reason "stop"."""
    model, tok = load(base_folders[True])
    tok = get_chat_template(tok, name, model=model)
    eot = tok.convert_tokens_to_ids(CHAT_TEMPLATES[name].end_of_turn)
    steps = fine_tune(model, tok)
    print(f"\n{name}: {steps} steps")

    max_new = 24
    for conversation in REPLIES:
        prompt = tok.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new)[0, len(ids):].tolist()
        assert out[-1] == eot and len(out) < max_new, tok.decode(out)
        assert tok.decode(out[:-1]).strip() == conversation[-1]["content"]

    with pytest.warns(UserWarning, match="pre-tokenizer"):  # our tiny BPE is not in llama.cpp's table
        (path,) = model.save_pretrained_gguf(tmp_path, tok, quantization_method="f16")
    reader = GGUFReader(path)
    assert reader.get_field("tokenizer.ggml.eos_token_id").contents() == eot
    assert reader.get_field("tokenizer.ggml.eot_token_id").contents() == eot
    stored = reader.get_field("tokenizer.chat_template").contents()
    assert stored == without_generation_markers(CHAT_TEMPLATES[name].jinja)
    modelfile = (tmp_path / "Modelfile").read_text()
    assert f'PARAMETER stop "{CHAT_TEMPLATES[name].end_of_turn}"' in modelfile
    assert CHAT_TEMPLATES[name].ollama in modelfile

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False)
    try:
        assert llm.token_eos() == eot
        for conversation in REPLIES:
            prompt = tok.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
            expected_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == expected_ids
            result = llm.create_chat_completion(
                messages=conversation[:-1], max_tokens=max_new, temperature=0.0, top_k=1
            )
            choice = result["choices"][0]
            assert choice["finish_reason"] == "stop", choice
            assert result["usage"]["completion_tokens"] < max_new
            assert choice["message"]["content"].strip() == conversation[-1]["content"]
            assert result["usage"]["prompt_tokens"] == len(expected_ids)  # the same prompt as the engine's
    finally:
        llm.close()


def test_with_lora_the_new_rows_stay_frozen(base_folders):
    """LoRA trains the projections only (``modules_to_save`` is not supported), so the rows of added tokens keep their
    mean initialisation (docs/chat_templates.md: use full fine-tuning or a tokenizer that has the tokens); a LoRA
    ``lm_head`` cannot be resized."""
    model, tok = load(base_folders[True])
    get_chat_template(tok, "chatml", model=model)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    assert not model.model.embed_tokens.weight.requires_grad and not model.lm_head.weight.requires_grad
    model.lm_head.add_lora(2, 4.0)
    with pytest.raises(ConfigurationError, match="cannot resize a LoRA or 4-bit lm_head"):
        resize_token_embeddings(model, model.args.vocab_size + 1)
