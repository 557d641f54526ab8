"""Chat templates that stop: each prompt format declared once, with the token that ends a turn.

A model fine-tuned on a base tokenizer learns to write the format's end-of-turn token (``<|im_end|>``,
``<|eot_id|>``, ...), but the base tokenizer's EOS is another token (``<|endoftext|>``), so llama.cpp,
Ollama and ``generate`` keep going past the answer. :func:`get_chat_template` sets a named format on a
tokenizer and registers its end-of-turn token as the EOS everywhere one is read:

* the tokenizer (``tokenizer.eos_token``): what the trainers append and train on;
* the model (``model.args.eos_token_id``, ``model.hf_config.eos_token_id``): where
  :func:`engine.models.generation.generate` stops by default and what a saved config says;
* the GGUF file (``tokenizer.ggml.eos_token_id`` from the tokenizer and ``tokenizer.ggml.eot_token_id`` from
  the template, written by :mod:`engine.gguf.writer`): where llama.cpp and Ollama stop;
* the Ollama ``Modelfile`` (``PARAMETER stop`` lines, :mod:`engine.gguf.modelfile`).

Each :class:`ChatTemplate` in :data:`CHAT_TEMPLATES` is the one declaration of a format: its Jinja
template (system / user / assistant messages, ``add_generation_prompt``, and Hugging Face's
``{% generation %}`` markers around what the assistant writes, so ``return_assistant_tokens_mask`` and
TRL's ``assistant_only_loss`` see the same tokens our :class:`~engine.SFTTrainer` trains), its end-of-turn
token, the special tokens it needs, its Ollama Go template and its stop strings. The Modelfile writer and
the GGUF writer read them from here; :func:`detect_chat_template` maps an existing tokenizer's template to a
name.

The templates are written for this engine from the published formats; where a model's own template does
more (tools, thinking blocks, dated system prompts), only the plain conversation is modelled. Choices:

* ``"qwen"`` is Qwen2.5's format: ChatML with the default system prompt ``"You are Qwen, created by Alibaba
  Cloud. You are a helpful assistant."`` when the conversation has none (the Modelfile carries it as
  ``SYSTEM``). ``"chatml"`` is plain ChatML (SmolLM2, and Qwen3 without its thinking blocks).
* ``"gemma"`` puts a system message at the start of the first user turn, as Gemma 3 does.
* ``"mistral"`` is the v3 (Mistral-7B-Instruct-v0.3) spacing, ``[INST] user[/INST] answer</s>``, with a system
  message at the start of the *first* user turn (v0.3 puts it in the last one, so a conversation's prefix would
  not render as a prefix of the conversation, which assistant-only training needs).
* ``"phi-3"`` ends every turn with ``<|end|>`` and, unlike Phi-3's own template, writes no extra EOS after
  the last turn (``<|end|>`` is the EOS once the template is set).
* ``"llama-3"`` is Llama 3's format without Llama 3.1's dated default system prompt.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from engine.errors import ConfigurationError

__all__ = [
    "CHAT_TEMPLATES",
    "ChatTemplate",
    "chat_template_for",
    "detect_chat_template",
    "get_chat_template",
    "resize_token_embeddings",
    "without_generation_markers",
]


@dataclass(frozen=True)
class ChatTemplate:
    """One prompt format, declared once.

    Attributes:
        name: the name :func:`get_chat_template` takes (``"chatml"``).
        summary: which models use it (the docs' table).
        jinja: the Hugging Face chat template (Jinja), with ``{% generation %}`` around each assistant reply
            and its end-of-turn token.
        end_of_turn: the token that ends an assistant turn; registered as EOS.
        special_tokens: tokens the format needs as single tokens; added to a tokenizer that lacks them.
        ollama: the Ollama ``TEMPLATE`` (Go template on ``.System``, ``.Prompt``, ``.Response``), written to the
            Modelfile. It renders the Jinja template's prompt without the leading BOS, which llama.cpp adds
            itself when the tokenizer does (``tokenizer.ggml.add_bos_token``).
        stop: the Modelfile's ``PARAMETER stop`` strings (the end-of-turn token first).
        default_system: the system prompt used when a conversation has none (the Modelfile's ``SYSTEM``).
        markers: text whose presence (all of it) in a chat template identifies this format.
    """

    name: str
    summary: str
    jinja: str
    end_of_turn: str
    special_tokens: tuple[str, ...]
    ollama: str
    stop: tuple[str, ...]
    markers: tuple[str, ...]
    default_system: str | None = None


# The templates are rendered with trim_blocks / lstrip_blocks (as transformers and llama-cpp-python do) and
# strip all layout whitespace themselves ({%- and {{-): every character of the output is in a string literal.

_CHATML_TURNS = r"""
{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}
        {%- generation %}
            {{- message['content'] + '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\n' }}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

_QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

_QWEN = (
    r"""
{%- if not messages or messages[0]['role'] != 'system' %}
    {{- '<|im_start|>system\n"""
    + _QWEN_SYSTEM
    + r"""<|im_end|>\n' }}
{%- endif %}"""
    + _CHATML_TURNS
)

_LLAMA3 = r"""
{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}
            {{- message['content'] | trim + '<|eot_id|>' }}
        {%- endgeneration %}
    {%- else %}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# A leading system message becomes the start of the first turn (Gemma and our Mistral have no system turn).
_SYSTEM_PREFIX = r"""
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system_prefix = messages[0]['content'] + '\n\n' %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set system_prefix = '' %}
    {%- set turns = messages %}
{%- endif %}"""

_GEMMA = (
    r"""
{{- bos_token }}"""
    + _SYSTEM_PREFIX
    + r"""
{%- for message in turns %}
    {%- if message['role'] == 'assistant' %}
        {{- '<start_of_turn>model\n' }}
        {%- generation %}
            {{- message['content'] | trim + '<end_of_turn>' }}
        {%- endgeneration %}
        {{- '\n' }}
    {%- else %}
        {{- '<start_of_turn>' + message['role'] + '\n' + (system_prefix if loop.first else '') }}
        {{- message['content'] | trim + '<end_of_turn>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<start_of_turn>model\n' }}
{%- endif %}
"""
)

_PHI3 = r"""
{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- '<|assistant|>\n' }}
        {%- generation %}
            {{- message['content'] + '<|end|>' }}
        {%- endgeneration %}
        {{- '\n' }}
    {%- elif message['role'] == 'system' %}
        {{- '<|system|>\n' + message['content'] + '<|end|>\n' }}
    {%- else %}
        {{- '<|user|>\n' + message['content'] + '<|end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|assistant|>\n' }}
{%- endif %}
"""

# The model writes the space after [/INST]: the prompt ends at [/INST] (add_generation_prompt adds nothing).
_MISTRAL = (
    r"""
{{- bos_token }}"""
    + _SYSTEM_PREFIX
    + r"""
{%- for message in turns %}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}
            {{- ' ' + message['content'] | trim + '</s>' }}
        {%- endgeneration %}
    {%- else %}
        {{- '[INST] ' + (system_prefix if loop.first else '') + message['content'] + '[/INST]' }}
    {%- endif %}
{%- endfor %}
"""
)

_OLLAMA_CHATML = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n"
)

_TEMPLATES = (
    ChatTemplate(
        name="chatml",
        summary="ChatML: SmolLM2, Qwen3 (without thinking blocks), many fine-tunes",
        jinja=_CHATML_TURNS.strip("\n"),
        end_of_turn="<|im_end|>",
        special_tokens=("<|im_start|>", "<|im_end|>"),
        ollama=_OLLAMA_CHATML,
        stop=("<|im_end|>", "<|im_start|>"),
        markers=("<|im_start|>", "<|im_end|>"),
    ),
    ChatTemplate(
        name="qwen",
        summary="Qwen2 / Qwen2.5: ChatML with Qwen's default system prompt",
        jinja=_QWEN.strip("\n"),
        end_of_turn="<|im_end|>",
        special_tokens=("<|im_start|>", "<|im_end|>"),
        ollama=_OLLAMA_CHATML,
        stop=("<|im_end|>", "<|im_start|>"),
        markers=("<|im_start|>", "<|im_end|>", "You are Qwen"),
        default_system=_QWEN_SYSTEM,
    ),
    ChatTemplate(
        name="llama-3",
        summary="Llama 3 / 3.1 / 3.2 Instruct",
        jinja=_LLAMA3.strip("\n"),
        end_of_turn="<|eot_id|>",
        special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        ollama=(
            "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
            "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
            "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>"
        ),
        stop=("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
        markers=("<|start_header_id|>", "<|eot_id|>"),
    ),
    ChatTemplate(
        name="gemma",
        summary="Gemma / Gemma 2 / Gemma 3 instruction-tuned",
        jinja=_GEMMA.strip("\n"),
        end_of_turn="<end_of_turn>",
        special_tokens=("<start_of_turn>", "<end_of_turn>"),
        ollama=(
            "<start_of_turn>user\n{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}<end_of_turn>\n"
            "<start_of_turn>model\n{{ .Response }}<end_of_turn>\n"
        ),
        stop=("<end_of_turn>", "<start_of_turn>"),
        markers=("<start_of_turn>", "<end_of_turn>"),
    ),
    ChatTemplate(
        name="phi-3",
        summary="Phi-3 / Phi-3.5 instruct",
        jinja=_PHI3.strip("\n"),
        end_of_turn="<|end|>",
        special_tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        ollama=(
            "{{ if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}"
            "{{ if .Prompt }}<|user|>\n{{ .Prompt }}<|end|>\n{{ end }}"
            "<|assistant|>\n{{ .Response }}<|end|>\n"
        ),
        stop=("<|end|>", "<|user|>", "<|assistant|>", "<|system|>"),
        markers=("<|user|>", "<|assistant|>", "<|end|>"),
    ),
    ChatTemplate(
        name="mistral",
        summary="Mistral Instruct (v0.3 spacing: `[INST] ...[/INST] answer</s>`)",
        jinja=_MISTRAL.strip("\n"),
        end_of_turn="</s>",
        special_tokens=("[INST]", "[/INST]", "</s>"),
        # The space before the answer is only written for earlier turns: the prompt ends at [/INST].
        ollama=(
            "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}[/INST]"
            "{{ if .Response }} {{ .Response }}</s>{{ end }}"
        ),
        stop=("</s>", "[INST]", "[/INST]"),
        markers=("[INST]", "[/INST]"),
    ),
)

#: Every named chat template: name -> declaration.
CHAT_TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in _TEMPLATES}

#: Other spellings accepted by :func:`chat_template_for`.
ALIASES = {"llama3": "llama-3", "llama-3.1": "llama-3", "phi3": "phi-3", "qwen2": "qwen", "qwen-2.5": "qwen",
           "qwen2.5": "qwen", "gemma2": "gemma", "gemma-2": "gemma", "gemma3": "gemma", "gemma-3": "gemma"}


def chat_template_for(name: str) -> ChatTemplate:
    """The declaration of a named template (case-insensitive; ``"llama3"``, ``"phi3"``, ... accepted too).

    Raises:
        ConfigurationError: for an unknown name, listing the valid ones.
    """
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in CHAT_TEMPLATES:
        raise ConfigurationError(
            f"unknown chat template {name!r}. Valid names: {', '.join(CHAT_TEMPLATES)} "
            f"(aliases: {', '.join(sorted(ALIASES))})"
        )
    return CHAT_TEMPLATES[key]


def detect_chat_template(template: str | dict | None) -> str | None:
    """The name of the format a Jinja chat template's text writes (``"chatml"``, ``"llama-3"``, ...), or ``None``.

    Recognised by the special tokens the text contains (a model's own template or one of ours); ChatML with
    Qwen's default system prompt is ``"qwen"``. A dict of named templates is judged by its ``"default"`` one.
    """
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    if not template:
        return None
    found = [t for t in _TEMPLATES if all(m in template for m in t.markers)]
    if not found:
        return None
    return max(found, key=lambda t: len(t.markers)).name  # the most specific: qwen before chatml


_GENERATION = re.compile(r"\{%(-?)\s*generation\s*(-?)%\}")
_END_GENERATION = re.compile(r"\{%(-?)\s*endgeneration\s*(-?)%\}")


def without_generation_markers(template: str) -> str:
    """``template`` with ``{% generation %}`` / ``{% endgeneration %}`` replaced by ``{% if true %}`` / ``{% endif %}``.

    The markers are a transformers extension of Jinja for training; a runtime without it (plain ``jinja2``, and
    so servers that read the template from a GGUF file) fails on the unknown tag. The replacement keeps the
    whitespace control of each tag, so the text renders the same. The GGUF writer stores this form.
    """
    template = _GENERATION.sub(lambda m: "{%" + m.group(1) + " if true " + m.group(2) + "%}", template)
    return _END_GENERATION.sub(lambda m: "{%" + m.group(1) + " endif " + m.group(2) + "%}", template)


# ---------------------------------------------------------------------------------------------- tokenizer + model


def _single_token_id(tokenizer, token: str) -> int | None:
    """The id of ``token`` when the tokenizer writes it as that one token, else ``None``."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    if list(tokenizer(token, add_special_tokens=False)["input_ids"]) != [token_id]:
        return None  # in the vocabulary but not recognised in text: it must become an added token
    return token_id


def resize_token_embeddings(model, vocab_size: int, init_ids: Sequence[int] = ()) -> None:
    """Grow a :class:`~engine.models.transformer.CausalLM`'s vocabulary to ``vocab_size`` rows, in place.

    ``model.embed_tokens`` and ``lm_head`` (tied or not) get the new rows, and so do
    ``model.args.vocab_size`` and ``model.hf_config.vocab_size``. New rows, and the rows of ``init_ids`` (tokens
    just added whose ids were already inside the matrix, as in Qwen's padded vocabulary), start as the mean
    of the other rows of each matrix. ``requires_grad`` is kept. Resize before creating the optimizer.

    Raises:
        ConfigurationError: ``vocab_size`` smaller than the model's, or a LoRA / 4-bit ``lm_head``.
    """
    embed = model.model.embed_tokens
    head = model.lm_head
    old_size = embed.weight.shape[0]
    if vocab_size < old_size:
        raise ConfigurationError(f"cannot shrink the vocabulary from {old_size} to {vocab_size} rows")
    if head.has_lora or head.is_quantized:
        raise ConfigurationError(
            "cannot resize a LoRA or 4-bit lm_head; add the chat template's tokens before get_peft_model / "
            "load_in_4bit"
        )
    tied = head.weight is embed.weight
    refill = sorted({int(i) for i in init_ids if 0 <= int(i) < old_size})

    def grown(weight: nn.Parameter) -> nn.Parameter:
        data = weight.detach()
        keep = torch.ones(old_size, dtype=torch.bool, device=data.device)
        keep[refill] = False
        mean = data[keep].float().mean(dim=0).to(data.dtype)
        new = torch.empty(vocab_size, data.shape[1], dtype=data.dtype, device=data.device)
        new[:old_size] = data
        new[old_size:] = mean
        new[refill] = mean
        return nn.Parameter(new, requires_grad=weight.requires_grad)

    embed.weight = grown(embed.weight)
    embed.num_embeddings = vocab_size
    head.weight = embed.weight if tied else grown(head.weight)
    head.out_features = vocab_size
    model.args.vocab_size = vocab_size
    if getattr(model, "hf_config", None) is not None:
        model.hf_config.vocab_size = vocab_size


def _register_eos(model, eos_id: int) -> None:
    """Make ``eos_id`` the model's first EOS (the old ones still stop generation)."""
    old = model.args.eos_token_id
    old_ids = [] if old is None else [old] if isinstance(old, int) else list(old)
    ids = [eos_id, *(i for i in old_ids if i != eos_id)]
    model.args.eos_token_id = ids
    if getattr(model, "hf_config", None) is not None:
        model.hf_config.eos_token_id = ids
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.eos_token_id = ids


def get_chat_template(tokenizer, name: str, model=None):
    """Set the named chat template on ``tokenizer`` and register its end-of-turn token as EOS.

    Args:
        tokenizer: a Hugging Face (fast) tokenizer; changed in place and returned.
        name: one of :data:`CHAT_TEMPLATES` (``"chatml"``, ``"qwen"``, ``"llama-3"``, ``"gemma"``, ``"phi-3"``,
            ``"mistral"``) or an alias (``"llama3"``, ``"phi3"``, ``"qwen2.5"``, ...).
        model (CausalLM, optional): the model to fine-tune. Needed when the tokenizer lacks some of the
            template's special tokens: its embeddings and ``lm_head`` then grow to the new vocabulary
            (:func:`resize_token_embeddings`, new rows = mean of the old ones). Its ``args.eos_token_id`` and
            ``hf_config.eos_token_id`` become ``[end-of-turn id, previous EOS ids...]``, so ``generate`` stops at
            the end of a turn.

    Returns:
        The tokenizer, with ``chat_template`` set, the template's special tokens added where missing and
        ``eos_token`` set to the end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``,
        ``</s>``). A GGUF export then writes it as ``tokenizer.ggml.eos_token_id`` and
        ``tokenizer.ggml.eot_token_id``, and the Modelfile stops on it.

    Raises:
        ConfigurationError: an unknown name (the message lists the valid ones), or tokens to add without a
            ``model`` to grow (the tokenizer is left unchanged).

    Example::

        model, tokenizer = FastModel.from_pretrained("Qwen/Qwen2.5-0.5B")   # base model, base tokenizer
        tokenizer = engine.get_chat_template(tokenizer, "qwen", model=model)
    """
    template = chat_template_for(name)
    missing = [t for t in template.special_tokens if _single_token_id(tokenizer, t) is None]
    vocab = tokenizer.get_vocab()
    new_tokens = [t for t in missing if t not in vocab]
    if new_tokens and model is None:
        raise ConfigurationError(
            f"the tokenizer lacks the {template.name!r} template's special tokens {new_tokens}; adding them grows "
            "the vocabulary, so the model's embeddings must grow too: pass the model, "
            f"get_chat_template(tokenizer, {template.name!r}, model=model)"
        )
    if missing:
        from tokenizers import AddedToken

        tokenizer.add_special_tokens(
            {"extra_special_tokens": [AddedToken(t, special=True, normalized=False) for t in missing]},
            replace_extra_special_tokens=False,
        )
    tokenizer.chat_template = template.jinja
    tokenizer.eos_token = template.end_of_turn
    eos_id = tokenizer.convert_tokens_to_ids(template.end_of_turn)
    if model is not None:
        added_ids = [tokenizer.convert_tokens_to_ids(t) for t in new_tokens]
        if len(tokenizer) > model.args.vocab_size or added_ids:
            resize_token_embeddings(model, max(len(tokenizer), model.args.vocab_size), init_ids=added_ids)
        _register_eos(model, eos_id)
    return tokenizer
