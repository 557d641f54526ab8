"""Sequence classification on the decoder: the causal LM's body with a linear ``score`` head.

:class:`CausalLMForSequenceClassification` is what transformers' ``*ForSequenceClassification`` models
(``GenericForSequenceClassification`` in ``transformers/modeling_layers.py``) are for our decoder:

* the decoder's final-norm hidden states ``[b, s, d]`` (no language-model head);
* pooled at one token per row: the rightmost token that is not ``pad_token_id`` (found from
  ``input_ids``, so left and right padding both work; a row of padding only pools its token 0);
  without a pad token only a single row is accepted; with ``inputs_embeds`` the last position;
* ``score``: ``nn.Linear(d, num_labels, bias=False)`` on the pooled states -> ``logits [b, num_labels]``;
* the loss transformers computes (``ForSequenceClassificationLoss``): the problem type is
  ``"regression"`` for ``num_labels == 1`` (MSE), ``"single_label_classification"`` for integer labels
  (cross-entropy, -100 ignored) and ``"multi_label_classification"`` otherwise (BCE with logits);
  chosen at the first loss unless given, then kept (as transformers keeps it in the config). The loss
  is the mean over the batch's rows; ``num_items_in_batch`` is ignored, as transformers ignores it.

Parameter names equal transformers' (``model.layers.*``, ``score.weight``), so a merged folder loads in
``AutoModelForSequenceClassification`` and a LoRA adapter (head in PEFT's ``modules_to_save``) in PEFT.
Build one with ``FastModel.from_pretrained(..., num_labels=N)``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from engine.errors import ConfigurationError, DatasetError
from engine.models.transformer import CausalLM

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
#: PEFT's ignored label (a row with this label adds nothing to the single-label loss).
IGNORE_INDEX = -100


def check_num_labels(num_labels) -> int:
    """``num_labels`` as an int >= 1, else a ConfigurationError saying what to pass."""
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ConfigurationError(
            f"num_labels must be a positive integer (the number of classes; 1 for regression), got {num_labels!r}"
        )
    return num_labels


def pooled_positions(input_ids: torch.Tensor | None, batch_size: int, pad_token_id: int | None):
    """Index of the token each row is classified at, transformers' rule.

    Args:
        input_ids (Tensor or None): int ``[b, s]`` (``None`` when the forward got ``inputs_embeds``).
        batch_size (int): ``b``.
        pad_token_id (int or None): the pad token.

    Returns:
        int64-compatible ``[b]`` tensor (the rightmost token that is not ``pad_token_id``; 0 for a row of
        padding only), or the int ``-1`` (the last position) without a pad token or without ``input_ids``.

    Raises:
        ConfigurationError: no pad token and more than one row (the padding cannot be found).
    """
    if pad_token_id is None:
        if batch_size != 1:
            raise ConfigurationError(
                f"cannot classify a batch of {batch_size} rows without a pad token: the last real token of each "
                "row is found by looking for pad_token_id. Give the tokenizer a pad token before loading "
                "(tokenizer.pad_token = tokenizer.eos_token) or pass FastModel.from_pretrained(..., "
                "pad_token_id=...), or classify one row at a time."
            )
        return -1
    if input_ids is None:
        return -1
    not_pad = (input_ids != pad_token_id).to(torch.int32)
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device, dtype=torch.int32)
    return (positions * not_pad).argmax(-1)


def problem_type_for(num_labels: int, labels: torch.Tensor) -> str:
    """transformers' choice: regression for one label, single-label for int/long labels, else multi-label."""
    if num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


def check_labels(labels: torch.Tensor, num_labels: int, problem_type: str) -> None:
    """Labels fit the problem: class indices in ``[0, num_labels)`` (or -100), or ``[b, num_labels]`` targets.

    Raises:
        DatasetError: naming the bad value and how to fix the data or the model.
    """
    if problem_type == "single_label_classification":
        if labels.is_floating_point():
            raise DatasetError(
                f"single_label_classification needs integer class indices, got {labels.dtype} labels; "
                "convert them to int64 (or use problem_type='multi_label_classification' for 0/1 targets)"
            )
        bad = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= num_labels))]
        if bad.numel():
            raise DatasetError(
                f"label {int(bad[0])} is outside [0, {num_labels}): this model has num_labels={num_labels}. "
                f"Map the dataset's labels to 0..{num_labels - 1} (-100 skips a row), or load the model with "
                "FastModel.from_pretrained(..., num_labels=<number of classes>)."
            )
    elif problem_type == "multi_label_classification" and labels.shape[-1:] != (num_labels,):
        raise DatasetError(
            f"multi_label_classification needs float targets of shape [batch, {num_labels}], got "
            f"{tuple(labels.shape)}; give each row a 0/1 vector with one entry per class "
            "(integer class indices mean single-label classification)"
        )


def classification_loss(logits, labels, problem_type: str, num_labels: int):
    """The loss transformers' ``ForSequenceClassificationLoss`` computes (a mean over the rows).

    Args:
        logits (Tensor): ``[b, num_labels]``.
        labels (Tensor): ``[b]`` class indices, ``[b, num_labels]`` targets, or ``[b]`` / ``[b, 1]`` values.
        problem_type (str): one of :data:`PROBLEM_TYPES`.
    """
    labels = labels.to(logits.device)
    if problem_type == "regression":
        labels = labels.to(logits.dtype)
        if num_labels == 1:
            return nn.functional.mse_loss(logits.squeeze(), labels.squeeze())
        return nn.functional.mse_loss(logits, labels)
    if problem_type == "single_label_classification":
        return nn.functional.cross_entropy(logits.view(-1, num_labels), labels.view(-1), ignore_index=IGNORE_INDEX)
    return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def classification_config(hf_config, num_labels: int, pad_token_id, problem_type, id2label):
    """A copy of the causal LM's transformers config describing the classifier (what merged saving writes).

    Sets ``num_labels``, ``id2label``/``label2id``, ``pad_token_id``, ``problem_type`` and
    ``architectures=[<Family>ForSequenceClassification]``.
    """
    if hf_config is None:
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    config = copy.deepcopy(hf_config)
    if id2label is None:
        labels = {i: f"LABEL_{i}" for i in range(num_labels)}
    else:
        labels = {int(k): v for k, v in id2label.items()}
    config.id2label = labels
    config.label2id = {v: k for k, v in labels.items()}
    config.num_labels = num_labels
    config.pad_token_id = pad_token_id
    config.problem_type = problem_type
    architecture = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(getattr(config, "model_type", None))
    if architecture is None:
        previous = (getattr(config, "architectures", None) or ["ForCausalLM"])[0]
        architecture = previous.replace("ForCausalLM", "ForSequenceClassification")
    config.architectures = [architecture]
    return config


class CausalLMForSequenceClassification(CausalLM):
    """Our decoder with a linear classification head (transformers' ``*ForSequenceClassification``).

    Args:
        args (ModelArgs): the architecture.
        num_labels (int): classes (1: regression).
        max_seq_length (int), device, dtype: as :class:`CausalLM`.
        pad_token_id (int, optional): the token whose positions are padding (see :func:`pooled_positions`).
        problem_type (str, optional): one of :data:`PROBLEM_TYPES`; ``None``: chosen at the first loss.
        id2label (dict, optional): ``{class index: name}`` written to the saved config.

    Attributes:
        score (nn.Linear): ``[num_labels, hidden]`` weight, no bias; trained fully under LoRA
            (PEFT's ``modules_to_save``; see :attr:`trainable_heads`).
    """

    #: For transformers.Trainer: the loss is a per-batch mean (``num_items_in_batch`` is ignored, as transformers'
    #: classification loss ignores it), so the Trainer divides it by the gradient accumulation steps.
    accepts_loss_kwargs = False
    loss_type = "ForSequenceClassification"
    #: Modules ``FastModel.get_peft_model`` keeps fully trainable and saves whole (PEFT's ``modules_to_save``).
    trainable_heads = ("score",)
    #: The adapter's ``task_type`` in ``adapter_config.json``.
    peft_task_type = "SEQ_CLS"

    def __init__(
        self,
        args,
        num_labels: int,
        max_seq_length: int = 2048,
        device=None,
        dtype=None,
        *,
        pad_token_id: int | None = None,
        problem_type: str | None = None,
        id2label: dict | None = None,
    ):
        check_num_labels(num_labels)
        if problem_type is not None and problem_type not in PROBLEM_TYPES:
            raise ConfigurationError(f"problem_type must be one of {PROBLEM_TYPES} or None, got {problem_type!r}")
        if id2label is not None and len(id2label) != num_labels:
            raise ConfigurationError(f"id2label names {len(id2label)} classes but num_labels={num_labels}")
        super().__init__(args, max_seq_length, device, dtype)
        del self.lm_head  # transformers' classification models have no language-model head
        self.score = nn.Linear(args.hidden_size, num_labels, bias=False, device=device, dtype=dtype)
        self.num_labels = num_labels
        self.pad_token_id = pad_token_id
        self.problem_type = problem_type
        self.id2label = id2label

    @classmethod
    def from_causal_lm(
        cls,
        lm: CausalLM,
        num_labels: int,
        *,
        pad_token_id: int | None = None,
        problem_type: str | None = None,
        id2label: dict | None = None,
        seed: int = 0,
    ) -> CausalLMForSequenceClassification:
        """The classifier on ``lm``'s decoder (its modules are moved, not copied; ``lm``'s head is dropped).

        ``score`` is initialised as transformers initialises it: normal with std ``initializer_range``
        (0.02 when the config has none), seeded by ``seed``.

        Raises:
            ConfigurationError: ``lm`` already has LoRA adapters (add the head first, then LoRA).
        """
        from engine.peft import has_adapters

        if has_adapters(lm):
            raise ConfigurationError(
                "this model already has LoRA adapters; load it with FastModel.from_pretrained(..., num_labels=N) "
                "and call FastModel.get_peft_model afterwards"
            )
        with torch.device("meta"):
            model = cls(lm.args, num_labels, lm.max_seq_length, dtype=lm.dtype, pad_token_id=pad_token_id,
                        problem_type=problem_type, id2label=id2label)
        model.model = lm.model
        model._workspace = lm._workspace
        for name in ("inv_freq", "local_inv_freq", "long_inv_freq"):
            setattr(model, name, getattr(lm, name))
        model.score = nn.Linear(lm.args.hidden_size, num_labels, bias=False, device=lm.device, dtype=lm.dtype)
        std = getattr(lm.hf_config, "initializer_range", None) or 0.02
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=generator) * std)
        model.name_or_path = lm.name_or_path
        model.gradient_checkpointing = lm.gradient_checkpointing
        model.tiled_mlp = lm.tiled_mlp
        model.hf_config = lm.hf_config
        model.train(lm.training)
        return model

    @property
    def config(self):
        """The transformers config of the classifier (``num_labels``, ``id2label``, ``pad_token_id``,
        ``problem_type``, ``architectures=[...ForSequenceClassification]``), built from the loaded config."""
        return classification_config(
            self.hf_config, self.num_labels, self.pad_token_id, self.problem_type, self.id2label
        )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        *,
        num_items_in_batch: int | torch.Tensor | None = None,
        **unused,
    ) -> SequenceClassifierOutput:
        """Classify each row.

        Args:
            input_ids (Tensor): int64 ``[b, s]``, padded left or right with ``pad_token_id`` (or ``inputs_embeds``).
            attention_mask (Tensor, optional): ``[b, s]``, 1 for real tokens; positions are then counted from
                each row's first real token (so a left-padded row equals the row alone).
            position_ids (Tensor, optional): ``[b, s]``.
            labels (Tensor, optional): ``[b]`` int class indices in ``[0, num_labels)`` (-100: row ignored),
                ``[b, num_labels]`` float targets (multi-label), or float values (regression).
            num_items_in_batch: accepted and ignored (transformers' classification loss ignores it too).

        Returns:
            ``transformers.modeling_outputs.SequenceClassifierOutput``: ``logits [b, num_labels]`` and ``loss``
            (``None`` without labels).

        Raises:
            ConfigurationError: no pad token with more than one row; unknown arguments.
            DatasetError: labels that do not fit ``num_labels`` / the problem type.
        """
        if unused:
            ignored = ("use_cache", "return_dict", "output_attentions", "output_hidden_states")
            unknown = sorted(k for k in unused if k not in ignored)
            if unknown:
                raise ConfigurationError(f"forward() got unexpected arguments {unknown}")
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        last = pooled_positions(input_ids, batch_size, self.pad_token_id)
        hidden, _ = self._hidden_states(input_ids, attention_mask, position_ids, None, inputs_embeds, None)
        pooled = hidden[torch.arange(batch_size, device=hidden.device), last]
        logits = self.score(pooled)
        loss = None
        if labels is not None:
            problem_type = self.problem_type or problem_type_for(self.num_labels, labels)
            check_labels(labels, self.num_labels, problem_type)
            self.problem_type = problem_type  # kept, as transformers keeps it in the config
            loss = classification_loss(logits, labels, problem_type, self.num_labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    # ------------------------------------------------------------------ what a classifier cannot do
    def _no_lm_head(self, what: str):
        raise ConfigurationError(
            f"{what} needs a language-model head; this is a classification model (num_labels={self.num_labels}). "
            "Load the model without num_labels for text generation."
        )

    def generate(self, *args, **kwargs):
        self._no_lm_head("generate()")

    def token_log_probs(self, *args, **kwargs):
        self._no_lm_head("token_log_probs()")

    def save_pretrained_gguf(self, *args, **kwargs):
        self._no_lm_head("GGUF export")
