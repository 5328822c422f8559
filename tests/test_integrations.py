"""The PyTorch Lightning and transformers Trainer recipes train, and follow the policy."""

import warnings

import pytest
import torch
from core_models import mlp
from torch import nn

import tinyprop

LOSS = nn.CrossEntropyLoss(reduction="none")
CONFIG = tinyprop.TinyPropConfig(policy="tinypropv2", skip_threshold=0.95)
STEPS, BATCH = 24, 4


def learnable_data(size=STEPS * BATCH, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 12, generator=generator, dtype=torch.float64)
    return x, x[:, :5].argmax(1)


def reference_run():
    """tinyprop.train_step on the same batches: the weights and trained counts to match."""
    torch.manual_seed(0)
    model = tinyprop.apply(mlp().double(), CONFIG)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = learnable_data()
    trained = [
        tinyprop.train_step(model, x[i : i + BATCH], y[i : i + BATCH], LOSS, optimizer).trained
        for i in range(0, len(x), BATCH)
    ]
    return model, trained


def lightning_classifier(model: nn.Module):
    """The recipe of docs/integrations.md: ``training_step`` returns ``tinyprop.loss``; Adam
    at 0.01 (benchmarks/user_models.py trains it too)."""
    import pytorch_lightning as pl

    class Classifier(pl.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            x, y = batch
            return tinyprop.loss(self.model, LOSS(self.model(x), y))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.01)

    return Classifier(model)


def test_lightning_recipe_equals_train_step(tmp_path, monkeypatch):
    pl = pytest.importorskip("pytorch_lightning")
    from tinyprop.integrations.lightning import TinyPropCallback

    class Trained(pl.Callback):
        def __init__(self):
            self.trained = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.trained.append(tinyprop.step_stats(pl_module.model).trained)

    expected, expected_trained = reference_run()
    torch.manual_seed(0)
    module = lightning_classifier(tinyprop.apply(mlp().double(), CONFIG))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*learnable_data()), batch_size=BATCH
    )
    trained = Trained()
    monkeypatch.chdir(tmp_path)
    trainer = fit(pl, module, loader, 1, [TinyPropCallback(), trained])
    assert trainer.global_step == STEPS
    assert trained.trained == expected_trained
    assert 0 in trained.trained and sum(trained.trained) < STEPS * BATCH / 2  # steps skipped
    assert_same_weights(module.model, expected)
    assert "tinyprop/backward_ratio" in trainer.callback_metrics
    assert list(tmp_path.iterdir()) == []  # no logs or checkpoints left behind


def test_lightning_manual_optimization_with_two_optimizers_equals_own_loop(tmp_path):
    """``automatic_optimization = False``, ``self.manual_backward(tinyprop.loss(...))``, then
    two optimizers step (one per part of the model). The callback reset its count of trained
    samples at the first optimizer's step, so it dropped the gradients before the second's:
    the output layer never trained, silently. Now both step on every backward that trained a
    sample, and on none when every sample was skipped, as in a loop of your own."""
    pl = pytest.importorskip("pytorch_lightning")
    from tinyprop.integrations.lightning import TinyPropCallback

    def optimizers(model):
        head = list(model[-1].parameters())
        body = [p for p in model.parameters() if all(p is not h for h in head)]
        return torch.optim.SGD(body, lr=0.1), torch.optim.SGD(head, lr=0.1)

    class Manual(pl.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model, self.automatic_optimization = model, False

        def training_step(self, batch, batch_idx):
            x, y = batch
            for optimizer in self.optimizers():
                optimizer.zero_grad()
            self.manual_backward(tinyprop.loss(self.model, LOSS(self.model(x), y)))
            for optimizer in self.optimizers():
                optimizer.step()

        def configure_optimizers(self):
            return optimizers(self.model)

    torch.manual_seed(0)
    expected = tinyprop.apply(mlp().double(), CONFIG)
    body, head = optimizers(expected)
    x, y = learnable_data()
    trained = 0
    for i in range(0, len(x), BATCH):
        body.zero_grad(), head.zero_grad()
        stats = tinyprop.backward(expected, LOSS(expected(x[i : i + BATCH]), y[i : i + BATCH]))
        trained += stats.trained
        if stats.trained:
            body.step(), head.step()
    assert 0 < trained < STEPS * BATCH / 2  # some steps skip every sample
    torch.manual_seed(0)
    module = Manual(tinyprop.apply(mlp().double(), CONFIG))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    fit(pl, module, loader, 1, [TinyPropCallback(log=False)], tmp_path)
    assert_same_weights(module.model, expected)


def test_lightning_model_applied_in_configure_model_trains_two_epochs_as_the_hand_loop(tmp_path):
    """A LightningModule that builds and applies its model in ``configure_model`` (Lightning
    calls it after the callbacks' ``setup``), two epochs: the weights of ``train_step`` on the
    same batches. TinyPropCallback looked for the applied model at ``setup``, found none and
    stopped the fit with "found 0 modules with tinyprop applied ... pass the one to follow",
    a model the user could not yet pass."""
    pl = pytest.importorskip("pytorch_lightning")
    from tinyprop.integrations.lightning import TinyPropCallback

    class Built(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = None

        def configure_model(self):
            if self.model is None:
                torch.manual_seed(0)
                self.model = tinyprop.apply(mlp().double(), CONFIG)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return tinyprop.loss(self.model, LOSS(self.model(x), y))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.01)

    torch.manual_seed(0)
    expected = tinyprop.apply(mlp().double(), CONFIG)
    optimizer = torch.optim.Adam(expected.parameters(), lr=0.01)
    x, y = learnable_data(6 * BATCH)
    for _ in range(2):
        for i in range(0, len(x), BATCH):
            tinyprop.train_step(expected, x[i : i + BATCH], y[i : i + BATCH], LOSS, optimizer)
    module = Built()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    trainer = fit(pl, module, loader, 2, [TinyPropCallback(log=False)], tmp_path)
    assert trainer.global_step == 2 * 6
    assert_same_weights(module.model, expected)


def tiny_transformer(kind: str):
    """A small BERT classifier or GPT-2 language model from a config (no weights loaded),
    dropout off, float64."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=16, num_labels=3,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        return transformers.BertForSequenceClassification(config).double()
    config = transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).double()


def token_data(kind: str, size=24, length=8):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (size, length), generator=generator)
    labels = ids[:, 0] % 3 if kind == "bert" else ids  # GPT-2: the model's own shifted labels
    return [{"input_ids": i, "labels": label} for i, label in zip(ids, labels, strict=True)]


def run_trainer(kind, folder, config=None, steps=6):
    """Train ``steps`` steps; plain ``Trainer`` on the model's own loss when config is None."""
    import transformers
    from transformers.pytorch_utils import Conv1D

    from tinyprop.integrations.transformers import (
        TinyPropTrainer,
        causal_lm_losses,
        sequence_losses,
    )

    model = tiny_transformer(kind)
    args = transformers.TrainingArguments(
        output_dir=str(folder), use_cpu=True, report_to=[], save_strategy="no",
        logging_strategy="no", per_device_train_batch_size=4, max_steps=steps,
        learning_rate=1e-2, seed=0, disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=0,
    )  # fmt: skip
    data = token_data(kind)
    losses = causal_lm_losses if kind == "gpt2" else sequence_losses
    if config is None:  # the mean of the same per-sample losses (GPT-2's own loss is float32)
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=data,
            compute_loss_func=lambda outputs, labels, **_: losses(outputs.logits, labels).mean(),
        )  # fmt: skip
    else:
        tinyprop.register_linear(Conv1D, transposed=True)
        model = tinyprop.apply(model, config)
        trainer = TinyPropTrainer(
            model=model, args=args, train_dataset=data, per_sample_loss=losses
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dense embeddings/layer norms named by apply, etc.
        trainer.train()
    return model


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_transformers_trainer_recipe_at_ratio_one_equals_plain_trainer(kind, tmp_path):
    expected = run_trainer(kind, tmp_path / "plain")
    got = run_trainer(
        kind, tmp_path / "tinyprop", tinyprop.TinyPropConfig(policy="topk", ratio=1.0)
    )
    state = {name: value for name, value in got.named_parameters()}
    for name, want in expected.named_parameters():
        torch.testing.assert_close(state[name], want, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_transformers_trainer_recipe_trains_sparse_and_skips(kind, tmp_path):
    config = tinyprop.TinyPropConfig(policy="tinypropv2", skip_threshold=0.9)
    initial = {name: value.clone() for name, value in tiny_transformer(kind).named_parameters()}
    model = run_trainer(kind, tmp_path, config)
    stats = tinyprop.step_stats(model)
    assert stats is not None and stats.macs.backward_ratio() < 1.0
    layers = [name for name, _ in tinyprop.model.state_of(model).layers]
    assert any("attention" in name or "attn" in name for name in layers), layers  # the body too
    changed = [
        name for name, value in model.named_parameters() if not torch.equal(value, initial[name])
    ]
    assert changed


def test_transformers_trainer_smooths_labels_as_the_trainer_and_refuses_a_batch_loss(tmp_path):
    """``label_smoothing_factor`` was ignored (the Trainer's own loss applies it, and
    TinyPropTrainer replaces that loss): the weights differed by 1.6e-3 from the plain
    Trainer's after 3 steps, silently. ``compute_loss_func`` was ignored too (and made the
    Trainer skip its division by the accumulation steps). Now the built-in per-sample losses
    smooth by that factor, and the rest is a ValueError."""
    transformers = pytest.importorskip("transformers")
    from tinyprop.integrations.transformers import TinyPropTrainer

    def arguments(name):
        return transformers.TrainingArguments(
            output_dir=str(tmp_path / name), use_cpu=True, report_to=[], save_strategy="no",
            logging_strategy="no", per_device_train_batch_size=4, max_steps=3,
            learning_rate=1e-2, seed=0, disable_tqdm=True, remove_unused_columns=False,
            dataloader_num_workers=0, label_smoothing_factor=0.1,
        )  # fmt: skip

    data = token_data("bert")
    plain = tiny_transformer("bert")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.Trainer(model=plain, args=arguments("plain"), train_dataset=data).train()
        config = tinyprop.TinyPropConfig(policy="topk", ratio=1.0)
        model = tinyprop.apply(tiny_transformer("bert"), config)
        TinyPropTrainer(model=model, args=arguments("tinyprop"), train_dataset=data).train()
    state = dict(model.named_parameters())
    for name, want in plain.named_parameters():  # the Trainer sums the smoothing in float32
        torch.testing.assert_close(state[name], want, rtol=0, atol=1e-8, msg=name)
    with pytest.raises(ValueError, match="per_sample_loss"):
        TinyPropTrainer(
            model=model, args=arguments("own"), train_dataset=data,
            per_sample_loss=lambda logits, labels: LOSS(logits, labels),
        )  # fmt: skip
    with pytest.raises(ValueError, match="compute_loss_func"):
        TinyPropTrainer(
            model=model, args=arguments("batch"), train_dataset=data,
            compute_loss_func=lambda outputs, labels, **_: outputs.logits.mean(),
        )  # fmt: skip


def test_transformers_trainer_trains_an_encoder_decoder_model(tmp_path):
    """T5 with input_ids and labels only: TinyPropTrainer popped the labels, so the model had
    no decoder inputs (ValueError from T5); it now makes them from the labels as the model
    does, and topk at 1.0 equals the plain Trainer on the model's own loss."""
    transformers = pytest.importorskip("transformers")
    from tinyprop.integrations.transformers import TinyPropTrainer, token_losses

    def t5():
        torch.manual_seed(0)
        config = transformers.T5Config(
            vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
            dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
        )  # fmt: skip
        return transformers.T5ForConditionalGeneration(config).double()

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 40, (8, 7), generator=generator)
    labels = torch.randint(3, 40, (8, 5), generator=generator)
    data = [{"input_ids": i, "labels": label} for i, label in zip(ids, labels, strict=True)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no",
        logging_strategy="no", per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
        seed=0, disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
    )  # fmt: skip
    plain = t5()
    model = tinyprop.apply(t5(), tinyprop.TinyPropConfig(policy="topk", ratio=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layer norms named by apply
        transformers.Trainer(model=plain, args=args, train_dataset=data).train()
        TinyPropTrainer(
            model=model, args=args, train_dataset=data, per_sample_loss=token_losses
        ).train()
    assert tinyprop.step_stats(model).keep  # the sparse layers ran
    for (name, got), want in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=name)


def test_lightning_ddp_with_gradient_accumulation(tmp_path):
    """2 processes (Lightning's "ddp" strategy, gloo), accumulate_grad_batches=2: topk at 1.0
    gives plain PyTorch's weights for the global batch, tinypropv2 keeps both ranks' weights
    equal when one rank skips its whole accumulation window, and nothing warns (tinyprop
    warned that the model was not wrapped in DDP: Lightning wraps the LightningModule)."""
    pytest.importorskip("pytorch_lightning")
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import lightning_ddp_job as job

    script = Path(__file__).with_name("lightning_ddp_job.py")
    # the ranks meet through a file: a MASTER_PORT held by another job (here: this test) is
    # not used (rank 0 failed to bind it, or joined a stranger's group, when Lightning's
    # port was taken between being picked and bound)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(taken.getsockname()[1])}
        done = subprocess.run(  # 40-210 s on 2 cores under load 6-10; a hang ends sooner
            [sys.executable, str(script), str(tmp_path)], cwd=tmp_path, capture_output=True,
            text=True, timeout=600, env=env,
        )  # fmt: skip
    logs = [tmp_path / f"rank{rank}.log" for rank in (0, 1)]
    said = "\n".join(  # each rank's stderr (a crash of rank 1 kills rank 0 silently)
        f"--- rank {rank} stderr ---\n"
        + (log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)")
        for rank, log in enumerate(logs)
    )
    outputs = [tmp_path / f"rank{rank}.json" for rank in (0, 1)]
    assert done.returncode == 0 and all(map(Path.exists, outputs)), (
        f"exit code {done.returncode}\n{done.stderr[-2000:]}\n{said}"
    )
    ranks = [json.loads(output.read_text()) for output in outputs]
    model = job.mlp()  # the reference: Adam on the 16 samples of each optimizer step
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = job.data()
    window = job.BATCH * job.ACCUMULATE  # the samples of one rank's optimizer step
    samplers = [  # Lightning's: shuffled with seed 0
        list(torch.utils.data.DistributedSampler(x, num_replicas=2, rank=rank, seed=0))
        for rank in (0, 1)
    ]
    for start in range(0, job.SAMPLES // 2, window):
        rows = [i for sampler in samplers for i in sampler[start : start + window]]
        optimizer.zero_grad()
        LOSS(model(x[rows]), y[rows]).mean().backward()
        optimizer.step()
    for policy in ("topk", "tinypropv2"):
        runs = [rank[policy] for rank in ranks]
        assert runs[0]["steps"] == job.SAMPLES // (2 * window)
        assert runs[0]["weights"] == runs[1]["weights"], policy
        assert runs[0]["warnings"] == runs[1]["warnings"] == [], policy
    for got, want in zip(ranks[0]["topk"]["weights"], model.parameters(), strict=True):
        torch.testing.assert_close(
            torch.tensor(got, dtype=torch.float64), want.detach().flatten(), rtol=0, atol=1e-10
        )
    trained = torch.tensor([rank["tinypropv2"]["trained"] for rank in ranks])  # (2, micro)
    per_window = trained.reshape(2, -1, job.ACCUMULATE).sum(2)  # (2, optimizer steps)
    assert bool(((per_window == 0).any(0) & (per_window > 0).any(0)).any())  # one rank alone


def lora_llama():
    """A LLaMA of a small config with peft's LoRA on q_proj and v_proj (lora_B drawn, not zero,
    so that every LoRA weight gets a gradient), float64."""
    import peft
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
    )  # fmt: skip
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config).double(), lora)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    return model


@pytest.mark.parametrize("ratio", [1.0, 0.1])
def test_peft_lora_trains_the_adapters_as_plain_pytorch_and_saves(ratio, tmp_path):
    """peft's LoRA: the frozen base layers backpropagate their input gradient sparsely, the
    adapters train; topk at 1.0 gives plain PyTorch's adapter gradients, at 0.1 the per-row
    top-k reference's. save_pretrained writes tinyprop's running maxima too (peft warns about
    their 0-d shape); a plain PeftModel loads the adapter and ignores them."""
    import peft
    from test_model_matrix import masked_reference, plain_gradients
    from transformers import LlamaForCausalLM

    def losses(output, ids):
        logits = output.logits[:, :-1].transpose(1, 2)
        return nn.functional.cross_entropy(logits, ids[:, 1:], reduction="none").mean(1)

    ids = torch.randint(3, 40, (3, 7), generator=torch.Generator().manual_seed(0))
    model = lora_llama()
    reference = masked_reference(lora_llama(), ratio) if ratio < 1 else lora_llama()
    expected = plain_gradients(reference, (ids,), ids, losses)
    tinyprop.apply(model, tinyprop.TinyPropConfig(policy="topk", ratio=ratio))
    stats = tinyprop.backward(model, losses(model(ids), ids))
    got = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and all("lora_" in name for name in got)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-10, msg=name)
    assert sum("lora_" in name for name in stats.keep) == 8  # A and B of q, v in 2 layers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path)
        torch.manual_seed(0)  # the base weights of lora_llama()
        base = LlamaForCausalLM(model.config).double()
        plain = peft.PeftModel.from_pretrained(base, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=0, atol=1e-12)


def accumulated_run(config, accelerate: bool) -> nn.Module:
    """SGD with momentum over the batches of learnable_data, an optimizer step every second
    batch: through accelerate's Accelerator(gradient_accumulation_steps=2), or by hand."""
    torch.manual_seed(0)
    model = mlp().double()
    if config is not None:
        tinyprop.apply(model, config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = learnable_data()
    if accelerate:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)  # process-wide: the Trainer tests leave theirs
        GradientState._reset_state()
        accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
        prepared, optimizer = accelerator.prepare(model, optimizer)
        try:
            trained = 0  # samples trained since the last optimizer step
            for start in range(0, len(x), BATCH):
                with accelerator.accumulate(prepared):
                    losses = LOSS(prepared(x[start : start + BATCH]), y[start : start + BATCH])
                    accelerator.backward(tinyprop.loss(prepared, losses))
                    trained += tinyprop.step_stats(prepared).trained
                    if accelerator.sync_gradients:  # the second batch
                        if trained:  # else zero gradients: momentum alone would move
                            optimizer.step()
                        optimizer.zero_grad()
                        trained = 0
        finally:
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
        return model
    for index, start in enumerate(range(0, len(x), BATCH), start=1):
        losses = LOSS(model(x[start : start + BATCH]), y[start : start + BATCH])
        if config is None:
            (losses.mean() / 2).backward()
        else:
            tinyprop.backward(model, losses, scale=1 / 2)
        if index % 2 == 0:
            optimizer.step()
            optimizer.zero_grad()
    return model


@pytest.mark.parametrize("config", [CONFIG, tinyprop.TinyPropConfig(policy="topk", ratio=1.0)])
def test_accelerate_gradient_accumulation_equals_the_hand_loop(config):
    """accelerate's recipe: accelerator.backward(tinyprop.loss(model, losses)) inside
    accelerator.accumulate(model) (the Accelerator divides the loss by 2, tinyprop reads that
    scale from the backward) gives the weights of tinyprop.backward(..., scale=1 / 2) by hand,
    skips included, when the optimizer does not step after two batches whose samples were all
    skipped (their tinyprop.loss leaves zero gradients, and SGD's momentum would step on them:
    0.05 off the hand loop, whose tinyprop.backward left no gradient); at topk 1.0 plain
    PyTorch's."""
    pytest.importorskip("accelerate")
    got = accumulated_run(config, accelerate=True)
    expected = accumulated_run(config, accelerate=False)
    references = [expected]
    if config.policy == "topk":
        references.append(accumulated_run(None, accelerate=False))
    for reference in references:
        for (name, p), q in zip(got.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-10, msg=name)


def fit(pl, module, loader, epochs: int, callbacks: list, root=None):
    """``Trainer.fit`` on the CPU, quiet (no logger, checkpoints, progress bar or summary)."""
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, callbacks=callbacks,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(module, loader)
    return trainer


def assert_same_weights(model: nn.Module, expected: nn.Module) -> None:
    """The parameters of ``model`` equal ``expected``'s to 1e-10, by name."""
    for (name, got), want in zip(model.named_parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=name)


def lora_llama_classifier(applied_first: tinyprop.TinyPropConfig | None = None):
    """A LLaMA sequence classifier of a small config with peft's LoRA on q_proj and v_proj and
    its head in ``modules_to_save`` (what peft's task_type="SEQ_CLS" does): peft trains a copy
    of the head. With ``applied_first``, tinyprop is applied before peft wraps the model."""
    import peft
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        num_labels=3, pad_token_id=0,
    )  # fmt: skip
    model = transformers.LlamaForSequenceClassification(config).double()
    if applied_first is not None:
        tinyprop.apply(model, applied_first)
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0,
        modules_to_save=["score"],
    )  # fmt: skip
    model = peft.get_peft_model(model, lora)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(generator=torch.Generator().manual_seed(1))
    return model


@pytest.mark.parametrize("ratio", [1.0, 0.1])
def test_peft_modules_to_save_after_apply_trains_as_before_apply(ratio):
    """peft wrapping an applied model copies its head (a sparse layer) for modules_to_save:
    the copy is the model's sparse layer, and the gradients and ledger are those of the
    model applied after peft (at ratio 1.0 plain PyTorch's). Before, the forward refused the
    copy: "layer 'score.modules_to_save.default' (Linear) is in two models given to
    tinyprop.apply" (copy.deepcopy of the sparse head had copied the whole model with it)."""
    from test_model_matrix import plain_gradients

    def losses(output, y):
        return nn.functional.cross_entropy(output.logits, y, reduction="none")

    generator = torch.Generator().manual_seed(0)
    ids, y = torch.randint(3, 40, (4, 7), generator=generator), torch.tensor([0, 1, 2, 1])
    config = tinyprop.TinyPropConfig(policy="topk", ratio=ratio)
    model = lora_llama_classifier(applied_first=config)
    reference = tinyprop.apply(lora_llama_classifier(), config)
    stats = tinyprop.backward(model, losses(model(ids), y))
    reference_stats = tinyprop.backward(reference, losses(reference(ids), y))
    assert stats.macs == reference_stats.macs
    assert [name.removeprefix("base_model.model.") for name in reference_stats.keep] == list(
        stats.keep
    )
    assert "score.modules_to_save.default" in stats.keep
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    if ratio == 1.0:
        expected = plain_gradients(lora_llama_classifier(), (ids,), y, losses)
    got = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-10, msg=name)
    merged = reference.merge_and_unload()  # its layers are the PeftModel's
    with pytest.raises(ValueError, match="sparse layer of the PeftModel given to tinyprop.apply"):
        tinyprop.backward(merged, losses(merged(ids), y))
