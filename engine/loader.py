"""``FastModel``: load a model and tokenizer, add LoRA, switch between training and inference.

The public entry points mirror what Unsloth users type::

    model, tokenizer = FastModel.from_pretrained("path/or/hub-id", max_seq_length=2048, load_in_4bit=True)
    model = FastModel.get_peft_model(model, r=16, lora_alpha=16)
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from engine.errors import CheckpointError, ConfigurationError
from engine.loading.safetensors_loader import iter_safetensors, load_hf_config, safetensors_files
from engine.loading.weights import load_weights
from engine.models.config import model_args_from_hf_config
from engine.models.families import family_for_model_type
from engine.models.transformer import CausalLM
from engine.modules import checkpointing
from engine.modules.checkpointing import CheckpointChoice, CheckpointPolicy
from engine.peft import (
    LoraSettings, add_lora, load_adapter_state_dict, resolve_target_modules, resolve_target_parameters,
)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """``dtype=None`` picks bf16 where the hardware computes it natively, else fp32 (pass fp16 explicitly on older GPUs)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ConfigurationError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype.lower()]
    if dtype is not None:
        raise ConfigurationError(f"dtype must be a torch.dtype, a string or None, got {dtype!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else torch.float32


def _resolve_source(model_name: str, token: str | None, revision: str | None) -> Path:
    """A local path for ``model_name``: itself if it exists, else a hub download."""
    path = Path(model_name).expanduser()
    if path.exists():
        return path
    looks_like_path = path.suffix == ".gguf" or model_name.startswith((".", "/", "~")) or model_name.count("/") > 1
    if looks_like_path:  # hub ids are "name" or "org/name"
        raise CheckpointError(f"{model_name} does not exist. Check the path.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(
            snapshot_download(
                model_name,
                revision=revision,
                token=token,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"],
            )
        )
    except HFValidationError as err:
        raise CheckpointError(f"{model_name!r} is neither an existing path nor a valid hub id ({err})") from err
    except OSError as err:  # network errors, missing repos and gated models all derive from OSError
        raise CheckpointError(
            f"could not download {model_name!r} from the Hugging Face hub: {err}. Check the name, your network "
            "and your token, or pass a local folder / .gguf file instead."
        ) from err


def _renamed(tensors, family):
    """``(name, tensor)`` pairs under the family's names for the text model; tensors it skips are dropped."""
    for name, tensor in tensors:
        ours = family.checkpoint_name(name)
        if ours is not None:
            yield ours, tensor


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"could not load a tokenizer from {folder}: {err}") from err


class FastModel:
    """Namespace of the engine's model-level entry points (Unsloth-compatible names)."""

    @staticmethod
    def from_pretrained(
        model_name: str | os.PathLike,
        max_seq_length: int = 2048,
        dtype: torch.dtype | str | None = None,
        load_in_4bit: bool = False,
        *,
        double_quant: bool = True,
        device: torch.device | str | None = None,
        token: str | None = None,
        revision: str | None = None,
        verbose: bool = True,
        num_labels: int | None = None,
        id2label: dict | None = None,
        problem_type: str | None = None,
        pad_token_id: int | None = None,
        **unused,
    ):
        """Load a model and its tokenizer.

        Args:
            model_name: a Hugging Face model folder (config.json + safetensors, sharded or not),
                a ``.gguf`` file (weights dequantized; tokenizer and chat template from the file),
                a folder holding a saved LoRA adapter (its base model is loaded first), or a hub id.
            max_seq_length (int): longest sequence the model accepts.
            dtype: ``torch.float32``/``float16``/``bfloat16`` or their names; ``None`` picks bf16
                where the hardware supports it (CUDA with bf16, CPUs with AVX-512-BF16), else fp32.
            load_in_4bit (bool): store the decoder's projection weights as NF4 (QLoRA).
            double_quant (bool): with ``load_in_4bit``, also quantize the NF4 scales.
            device: where the model goes (default CUDA if available, else CPU).
            token, revision: for hub downloads.
            verbose (bool): print a one-line summary (architecture, dtype, memory footprint).
            num_labels (int, optional): load a sequence classifier instead of a language model: the decoder with
                a linear ``score`` head ``[num_labels, hidden]`` (no bias, random), pooled at each row's rightmost
                non-pad token, as transformers' ``*ForSequenceClassification``
                (:class:`~engine.models.classification.CausalLMForSequenceClassification`; 1 = regression).
            id2label (dict, optional): ``{class index: name}`` for the classifier's saved config.
            problem_type (str, optional): ``"single_label_classification"``, ``"multi_label_classification"`` or
                ``"regression"``; default: chosen from ``num_labels`` and the labels' dtype at the first loss.
            pad_token_id (int, optional): the classifier's pad token (default: the tokenizer's, else the config's).

        Returns:
            ``(model, tokenizer)``: a :class:`~engine.models.transformer.CausalLM` (with ``num_labels``, a
            :class:`~engine.models.classification.CausalLMForSequenceClassification`) and a transformers tokenizer.

        Raises:
            UnsupportedArchitectureError, CheckpointError, ConfigurationError: with what to do.
        """
        for key in unused:
            if key not in ("trust_remote_code", "device_map", "load_in_8bit", "fix_tokenizer", "full_finetuning"):
                raise ConfigurationError(f"from_pretrained() got an unexpected argument {key!r}")
        if unused.get("load_in_8bit"):
            raise ConfigurationError("load_in_8bit is not supported; use load_in_4bit=True or a 16-bit dtype")
        if max_seq_length <= 0:
            raise ConfigurationError(f"max_seq_length must be positive, got {max_seq_length}")
        device = torch.device(device) if device is not None else default_device()
        torch_dtype = resolve_dtype(dtype, device)
        source = _resolve_source(str(model_name), token, revision)

        if num_labels is not None:
            from engine.models.classification import check_num_labels

            check_num_labels(num_labels)  # before any weight is read
        if source.is_dir() and (source / "adapter_config.json").is_file():
            head = dict(num_labels=num_labels, id2label=id2label, problem_type=problem_type, pad_token_id=pad_token_id)
            return FastModel._from_adapter(
                source, max_seq_length, torch_dtype, load_in_4bit, double_quant, device, token, verbose, head
            )

        if source.suffix == ".gguf":
            from engine.gguf.reader import load_gguf_tokenizer, read_gguf_checkpoint

            checkpoint = read_gguf_checkpoint(source)
            hf_config = checkpoint.config
            tensors = iter(checkpoint.state_dict.items())
            tokenizer = load_gguf_tokenizer(source)
        elif source.is_dir():
            hf_config = load_hf_config(source)
            family = family_for_model_type(getattr(hf_config, "model_type", None))
            text_config = family.text_config(hf_config)
            model_args_from_hf_config(text_config)  # architecture check before touching weights
            tensors = family.checkpoint_tensors(iter_safetensors(safetensors_files(source), device="cpu"), text_config)
            if text_config is not hf_config:
                print(f"engine: {source.name} is a multimodal {hf_config.model_type} checkpoint; loading its text "
                      "model only (the vision tower is skipped)")
                tensors = _renamed(tensors, family)
                hf_config = text_config
            tokenizer = _load_tokenizer(source) if (source / "tokenizer_config.json").is_file() or (source / "tokenizer.json").is_file() else None
        else:
            raise CheckpointError(f"{source} is neither a model folder nor a .gguf file")

        args = model_args_from_hf_config(hf_config)
        with torch.device("meta"):
            model = CausalLM(args, max_seq_length=max_seq_length, dtype=torch_dtype)
        load_weights(
            model, tensors, dtype=torch_dtype, device=device, load_in_4bit=load_in_4bit, double_quant=double_quant, source=str(source)
        )
        model.hf_config = hf_config
        model.name_or_path = str(model_name)
        model.eval()
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        if num_labels is not None:
            from engine.models.classification import CausalLMForSequenceClassification

            if pad_token_id is None:
                pad_token_id = (
                    tokenizer.pad_token_id if tokenizer is not None else getattr(hf_config, "pad_token_id", None)
                )
            model = CausalLMForSequenceClassification.from_causal_lm(
                model, num_labels, pad_token_id=pad_token_id, problem_type=problem_type, id2label=id2label
            )
        if verbose:
            print(
                f"engine: loaded {args.model_type} ({args.num_layers} layers, hidden {args.hidden_size}) from {source.name} "
                f"| {str(torch_dtype).replace('torch.', '')}{' + NF4 4-bit' if load_in_4bit else ''} on {device} "
                f"| memory footprint {model.get_memory_footprint() / 2**20:.1f} MiB | {_kernel_summary(device, torch_dtype)}"
            )
        return model, tokenizer

    @staticmethod
    def _from_adapter(folder, max_seq_length, dtype, load_in_4bit, double_quant, device, token, verbose, head):
        config = json.loads((folder / "adapter_config.json").read_text())
        base = config.get("base_model_name_or_path")
        if not base:
            raise CheckpointError(f"{folder}/adapter_config.json does not name its base model (base_model_name_or_path)")
        if config.get("task_type") == "SEQ_CLS" and head["num_labels"] is None:
            head = {**head, "num_labels": _adapter_num_labels(folder)}
        model, tokenizer = FastModel.from_pretrained(
            base, max_seq_length, dtype, load_in_4bit, double_quant=double_quant, device=device, token=token,
            verbose=verbose, **head,
        )
        FastModel.load_adapter(model, folder)
        if (folder / "tokenizer_config.json").is_file():
            tokenizer = _load_tokenizer(folder)
        return model, tokenizer

    @staticmethod
    def load_adapter(model, adapter_dir: str | os.PathLike):
        """Load a PEFT-format LoRA adapter (ours or PEFT's) into ``model``, adding adapters first if it has none."""
        from safetensors.torch import load_file

        from engine.peft import has_adapters

        folder = Path(adapter_dir)
        config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
        if not config_path.is_file() or not weights_path.is_file():
            raise CheckpointError(f"{folder} needs adapter_config.json and adapter_model.safetensors")
        config = json.loads(config_path.read_text())
        if config.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{folder} holds a {config.get('peft_type')} adapter; only LoRA is supported")
        if config.get("task_type") == "SEQ_CLS" and "score" not in getattr(model, "trainable_heads", ()):
            raise CheckpointError(
                f"{folder} holds a sequence-classification adapter (with a score head); load it with "
                f"FastModel.from_pretrained({str(folder)!r}) or onto a model loaded with num_labels=N"
            )
        patterns = {k: config[k] for k in ("rank_pattern", "alpha_pattern") if config.get(k)}
        if patterns:
            raise CheckpointError(
                f"{folder}: adapter_config.json sets {patterns} (per-module ranks or alphas; PEFT writes them when "
                "the experts' gate and up projections were targeted separately and fused). The engine loads adapters "
                "with one rank and alpha; retrain with target_parameters=['experts.gate_up_proj', "
                "'experts.down_proj'] or merge the adapter with PEFT first."
            )
        if not has_adapters(model):
            FastModel.get_peft_model(
                model,
                r=config["r"],
                lora_alpha=config["lora_alpha"],
                lora_dropout=config.get("lora_dropout", 0.0),
                target_modules=config["target_modules"] or [],
                target_parameters=config.get("target_parameters") or [],
                use_rslora=config.get("use_rslora", False),
                use_gradient_checkpointing=False,
            )
        load_adapter_state_dict(model, load_file(str(weights_path)), source=str(weights_path))
        return model

    @staticmethod
    def get_peft_model(
        model: CausalLM,
        r: int = 16,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        target_modules=None,
        use_rslora: bool = False,
        use_gradient_checkpointing: bool | str | CheckpointPolicy = "auto",
        random_state: int = 3407,
        bias: str = "none",
        tiled_mlp: bool | int | str = False,
        memory_budget_gb: float | None = None,
        target_parameters=None,
        **unused,
    ) -> CausalLM:
        """Freeze the base model and add LoRA adapters (PEFT-compatible initialisation and scaling).

        Args:
            model: from :meth:`from_pretrained`.
            r (int): adapter rank. lora_alpha (float): scale numerator (``alpha / r``).
            lora_dropout (float): dropout on the adapters' input.
            target_modules: projection names, or ``"all-linear"``; default ``None``: every projection of the model's
                family (Llama-shaped: q/k/v/o/gate/up/down_proj; Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj;
                mixture of experts: the attention projections, a dense layer's MLP, and the experts, see
                ``target_parameters``).
            use_rslora (bool): scale by ``alpha / sqrt(r)``.
            use_gradient_checkpointing: which decoder layers are recomputed in backward (gradient checkpointing:
                less memory, more time; the loss and gradients are the same). ``"auto"`` (default): the memory
                planner picks the fastest policy whose planned peak fits the memory budget, trying ``False``,
                ``"every_4"``, ``"every_2"``, ``True`` and (CUDA only) ``"smart"`` in that order, when the step's
                shape is known: when an engine trainer starts (from its config), or at the first training forward
                of your own loop (from that batch); see :meth:`resolve_gradient_checkpointing`. ``False``: none.
                ``True``: every layer. ``"every_<k>"`` (k >= 2): layers ``0, k, 2k, ...``. ``"smart"`` (alias
                ``"unsloth"``): every layer, and on CUDA each layer's saved input waits in CPU memory.
            random_state (int): seed of the adapter initialisation.
            bias (str): only ``"none"`` (biases stay frozen).
            tiled_mlp: compute each decoder layer's MLP in tiles of rows during training, so that it saves
                only its input for backward and one tile's ``[rows, intermediate]`` activations exist at a
                time (costs one extra MLP forward per step; see :meth:`set_tiled_mlp`). ``False``/``0``: off;
                ``True``: tiles of :func:`engine_kernels.tiled_mlp.default_tile_rows` rows; ``"auto"``: about 16 tiles
                per sequence (:func:`engine_kernels.tiled_mlp.auto_tile_rows`); an int: that many rows.
            memory_budget_gb (float, optional): with ``use_gradient_checkpointing="auto"``, the memory (GiB) a
                training step may use in all, weights included, compared with the planned peak. Default: the
                model's own memory plus 80% of what is free now (free CUDA memory on a GPU, ``MemAvailable`` on
                CPU). Pin it to make the choice independent of the machine.
            target_parameters: mixture-of-experts models: weights adapted in PEFT's ``target_parameters`` form,
                from ``"experts.gate_up_proj"``, ``"experts.down_proj"`` (every expert's projections, one rank-``r``
                adapter per expert) and ``"gate.weight"`` (the router). Default ``None``: both expert projections when
                ``target_modules`` is ``None``/``"all-linear"``, else none. These need ``lora_dropout=0`` (as PEFT).

        Returns:
            The same model object, now with trainable adapters.

        Raises:
            ConfigurationError: an unknown argument or an invalid value (e.g. a negative ``tiled_mlp``, an unknown
                ``use_gradient_checkpointing``, a ``memory_budget_gb`` that is not a positive number).
        """
        for key in unused:
            if key not in ("max_seq_length", "loftq_config", "init_lora_weights", "modules_to_save"):
                raise ConfigurationError(f"get_peft_model() got an unexpected argument {key!r}")
        heads = list(getattr(model, "trainable_heads", ()))
        extra = [m for m in unused.get("modules_to_save") or () if m not in heads]
        if extra:
            raise ConfigurationError(
                f"modules_to_save={extra} is not supported: only a classification model's head ('score', from "
                "FastModel.from_pretrained(..., num_labels=N)) is trained whole (always); train adapters on "
                "projections otherwise"
            )
        if bias != "none":
            raise ConfigurationError(f"bias={bias!r} is not supported; only bias='none'")
        _tile_rows(model, tiled_mlp)  # validated before the model is changed
        CheckpointPolicy.parse(use_gradient_checkpointing)
        _check_memory_budget(memory_budget_gb, use_gradient_checkpointing)
        settings = LoraSettings(
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=resolve_target_modules(target_modules, model.args.family.lora_targets)
            if target_modules != [] or not target_parameters else [],
            target_parameters=resolve_target_parameters(
                target_parameters, model.args.family.lora_parameters, lora_dropout, target_modules
            ),
            use_rslora=use_rslora,
            modules_to_save=heads,
            task_type=getattr(model, "peft_task_type", "CAUSAL_LM"),
        )
        add_lora(model, settings, random_state=random_state)
        FastModel.set_gradient_checkpointing(model, use_gradient_checkpointing, memory_budget_gb=memory_budget_gb)
        FastModel.set_tiled_mlp(model, tiled_mlp)
        model.train()
        return model

    @staticmethod
    def set_tiled_mlp(model: CausalLM, tiled_mlp: bool | int | str) -> None:
        """Turn the tiled MLP (:mod:`engine_kernels.tiled_mlp`) on or off for every decoder layer.

        In training, an MLP whose input has more tokens (``batch * sequence``) than the tile runs tile by tile:
        it saves only its input ``x`` for backward (not ``g``, ``u``: ``2 * intermediate`` values per token and
        layer), and its backward recomputes each tile's forward, so one tile's ``[rows, intermediate]``
        activations are alive at a time in the whole model. Cost: one extra forward of the MLP per step. Full
        fine-tuning (trainable base weights) stays untiled. Results equal the untiled MLP up to summation order.

        Args:
            model: from :meth:`from_pretrained`.
            tiled_mlp: ``False`` or ``0``: off. ``True``: tiles of
                :func:`engine_kernels.tiled_mlp.default_tile_rows` rows for the model's hidden and intermediate sizes
                (e.g. 8192 for Llama-3.1-8B). ``"auto"``: about 16 tiles per sequence, at least 1024 rows each
                (:func:`engine_kernels.tiled_mlp.auto_tile_rows`; the memory-lean choice for long contexts). A positive
                int: that many rows per tile.

        Mixture-of-experts layers are tiled too: routing and experts run tile by tile, each tile recomputed in
        backward (:class:`~engine.modules.moe.SparseMoeBlock`).

        Sets ``layer.mlp.tile_rows`` of every layer and ``model.tiled_mlp`` (the rows per tile, ``None`` when off).

        Raises:
            ConfigurationError: ``tiled_mlp`` is negative or neither a bool nor an int.
        """
        rows = _tile_rows(model, tiled_mlp)
        for layer in model.model.layers:
            layer.mlp.tile_rows = rows
        model.tiled_mlp = rows

    @staticmethod
    def set_gradient_checkpointing(
        model: CausalLM, mode: bool | str | CheckpointPolicy, memory_budget_gb: float | None = None
    ) -> None:
        """Choose which decoder layers are recomputed in backward.

        Args:
            model: from :meth:`from_pretrained`.
            mode: ``False`` (none), ``True`` (every layer), ``"every_<k>"`` (layers ``0, k, 2k, ...``, k >= 2),
                ``"smart"`` (every layer, inputs offloaded to CPU memory on CUDA; alias ``"unsloth"``), a
                :class:`~engine.modules.checkpointing.CheckpointPolicy`, or ``"auto"`` (chosen by the memory
                planner once the step's shape is known; see :meth:`resolve_gradient_checkpointing`).
            memory_budget_gb (float, optional): the budget ``"auto"`` compares planned peaks with (see
                :meth:`get_peft_model`).

        Sets ``model.gradient_checkpointing`` (``False``, ``True``, ``"smart"``, ``"every_<k>"`` or ``"auto"``);
        ``model.checkpoint_policy`` is the resolved :class:`~engine.modules.checkpointing.CheckpointPolicy`
        (``None`` while ``"auto"`` is not resolved).

        Raises:
            ConfigurationError: an unknown mode, or a ``memory_budget_gb`` that is not a positive number.
        """
        policy = CheckpointPolicy.parse(mode)
        _check_memory_budget(memory_budget_gb, mode)
        if policy is None:
            value = "auto"
        else:
            value = policy if policy._force_copy else policy.value  # the testing switch lives on the object
        model.gradient_checkpointing = value
        model._checkpoint_memory_budget_gb = memory_budget_gb
        model._auto_checkpoint_choice = None

    @staticmethod
    def resolve_gradient_checkpointing(
        model: CausalLM,
        batch_size: int,
        seq_len: int,
        *,
        optimizer: str = "adamw",
        when: str = "resolve_gradient_checkpointing",
        verbose: bool = True,
    ) -> CheckpointChoice:
        """Resolve ``use_gradient_checkpointing="auto"`` for steps of ``batch_size x seq_len`` tokens, now.

        The engine trainers call this when training starts; without a trainer the first training forward does
        (for its batch's shape). Call it yourself before your own loop to plan for your largest batch. For a
        model whose policy is not ``"auto"`` nothing is planned and the choice names that policy.

        The planner (:func:`engine.memory.planner.choose_checkpointing`) plans a training step of this model on
        fake tensors for each policy in order of speed (``none``, ``every_4``, ``every_2``, ``all``, and on
        CUDA ``smart``) and keeps the first whose planned peak fits the budget (``memory_budget_gb``, or the
        model's own memory plus 80% of the free memory). Plans are cached per model shape. Should the planner
        fail to run the model's step (a code path fake tensors cannot follow), it warns and checkpoints every layer.

        Args:
            model: from :meth:`get_peft_model`.
            batch_size (int): rows per step (1 for a padding-free batch).
            seq_len (int): tokens per row.
            optimizer (str): ``"adamw"``, ``"adamw_8bit"`` or ``"sgd"`` (what the plan's optimizer state holds).
            when (str): recorded in the choice (the report says when it was made).
            verbose (bool): print the choice in one line.

        Returns:
            CheckpointChoice: the policy, the reason, the planned peak of every policy tried and the budget.

        Raises:
            ConfigurationError: no policy fits the budget (the message names the smallest plan and its size).
        """
        requested = model.gradient_checkpointing
        if CheckpointPolicy.parse(requested) is not None:
            policy = CheckpointPolicy.parse(requested)
            return CheckpointChoice(policy, str(requested), f"use_gradient_checkpointing={requested!r}")
        from engine.memory.planner import choose_checkpointing

        start = time.perf_counter()
        try:
            choice = choose_checkpointing(
                model, batch_size, seq_len, memory_budget_gb=model.__dict__.get("_checkpoint_memory_budget_gb"),
                optimizer=optimizer,
            )
        except ConfigurationError:
            raise
        except Exception as err:  # noqa: BLE001 -- the planner could not run this step (e.g. a kernel fake tensors lack)
            import warnings

            reason = (
                f"auto could not plan a step of {batch_size} x {seq_len} tokens ({type(err).__name__}: {err}); "
                "checkpointing every layer, the policy with the least memory on every device"
            )
            warnings.warn(
                f"use_gradient_checkpointing='auto': {reason}. Pass a policy (False, True, 'every_2', ...) to choose.",
                stacklevel=2,
            )
            choice = CheckpointChoice(CheckpointPolicy("all"), "auto", reason, batch_size, seq_len)
        choice.when = when
        choice.planning_seconds = time.perf_counter() - start
        model._auto_checkpoint_choice = choice
        if verbose:
            print(f"engine: {choice.summary()}")
        return choice

    @staticmethod
    def for_inference(model: CausalLM) -> CausalLM:
        """Evaluation mode: no dropout, no checkpointing overhead (generation uses the KV cache)."""
        model.eval()
        return model

    @staticmethod
    def for_training(model: CausalLM) -> CausalLM:
        """Training mode (dropout and gradient checkpointing as configured)."""
        model.train()
        return model


def _adapter_num_labels(folder: Path) -> int:
    """Classes of a saved classification adapter: the rows of its ``score`` head (PEFT's key)."""
    from safetensors import safe_open

    from engine.peft import PEFT_PREFIX

    key = f"{PEFT_PREFIX}score.weight"
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        if key not in f.keys():
            raise CheckpointError(
                f"{folder} is a SEQ_CLS adapter without {key}; pass FastModel.from_pretrained(..., num_labels=N)"
            )
        return int(f.get_slice(key).get_shape()[0])


def _check_memory_budget(memory_budget_gb, mode) -> None:
    """``memory_budget_gb`` is ``None`` or a positive, finite number of GiB (and only meaningful with ``"auto"``)."""
    if memory_budget_gb is None:
        return
    if (
        isinstance(memory_budget_gb, bool)
        or not isinstance(memory_budget_gb, (int, float))
        or not math.isfinite(memory_budget_gb)
        or memory_budget_gb <= 0
    ):
        raise ConfigurationError(
            f"memory_budget_gb must be a positive number of GiB (e.g. 20 for a 24 GB GPU, leaving room for the "
            f"CUDA context), or None to use the free memory; got {memory_budget_gb!r}"
        )
    if CheckpointPolicy.parse(mode) is not None:
        raise ConfigurationError(
            f"memory_budget_gb is the budget of use_gradient_checkpointing='auto'; with "
            f"use_gradient_checkpointing={mode!r} it would be ignored. Drop it, or use 'auto'."
        )


def _resolve_auto_at_forward(model: CausalLM, rows: int, seq_len: int, when: str) -> CheckpointChoice:
    """``"auto"`` at a training forward no trainer prepared: plan for this batch's shape (see ``training_policy``)."""
    return FastModel.resolve_gradient_checkpointing(model, rows, seq_len, when=when)


checkpointing.register_auto_resolver(_resolve_auto_at_forward)


def _tile_rows(model: CausalLM, tiled_mlp) -> int | str | None:
    """Rows per MLP tile for ``tiled_mlp`` (``"auto"``, or ``None`` when off); see :meth:`FastModel.set_tiled_mlp`."""
    from engine_kernels.tiled_mlp import default_tile_rows

    if tiled_mlp == "auto":
        return "auto"
    if tiled_mlp is True:
        return default_tile_rows(model.args.hidden_size, model.args.intermediate_size)
    if tiled_mlp is False:
        return None
    if not isinstance(tiled_mlp, int) or tiled_mlp < 0:
        raise ConfigurationError(
            f"tiled_mlp must be False, True, 'auto' or a non-negative number of rows per tile, got {tiled_mlp!r}"
        )
    return tiled_mlp or None


#: Unsloth's older name for the same entry points.
FastLanguageModel = FastModel


def _kernel_summary(device, dtype) -> str:
    """``"kernels: Triton for rms_norm, rope, ...; PyTorch for the rest"`` (and a named attention package)."""
    from engine_kernels.dispatch import describe_backends

    backends = describe_backends(device, dtype)
    attention = backends["attention"]
    if attention in ("flash_attn", "xformers"):
        backends["attention"] = "torch"  # reported by name below
        package = f"; attention: {attention}"
    else:
        package = ""
    triton_ops = [op for op, backend in backends.items() if backend == "triton"]
    if not triton_ops:
        return f"kernels: PyTorch{package}"
    from engine_kernels._triton import interpreting

    where = " (Triton's CPU interpreter: slow, for testing)" if interpreting() else ""
    return f"kernels: Triton{where} for {', '.join(triton_ops)}; PyTorch for the rest{package}"
