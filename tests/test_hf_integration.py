"""ZOTrainer: a transformers.Trainer whose steps are exactly zotune's ZO steps, nothing more."""
import torch
from transformers import TrainingArguments

from zotune import ZOOptimizer
from zotune.integrations.hf import ZOTrainer

from helpers import tiny_llama

STEPS, BATCH = 5, 4


class Sequences(torch.utils.data.Dataset):
    def __init__(self, n=40, length=10):
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, 96, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer_for(model, tmp_path, accumulation=1):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=BATCH,
                             gradient_accumulation_steps=accumulation, learning_rate=1e-3,
                             lr_scheduler_type="constant", report_to=[], save_strategy="no",
                             use_cpu=True, logging_steps=1, train_sampling_strategy="sequential",
                             dataloader_num_workers=0, max_grad_norm=1.0)
    return ZOTrainer(model=model, args=args, train_dataset=Sequences(),
                     zo_kwargs={"method": "mezo", "eps": 1e-3, "seed": 7})


def direct_run(accumulation=1):
    model = tiny_llama()
    data = Sequences()
    opt = ZOOptimizer([(n, p) for n, p in model.named_parameters()], lr=1e-3, eps=1e-3, seed=7)
    losses = []
    for step in range(STEPS):
        closures = []
        for m in range(accumulation):
            start = (step * accumulation + m) * BATCH
            ids = data.ids[start:start + BATCH]
            closures.append(lambda ids=ids: model(input_ids=ids, labels=ids).loss)
        losses.append(opt.step(closures))
    return model, losses, opt


def test_trainer_steps_equal_direct_zo_steps(tmp_path):
    model = tiny_llama()
    start = [p.detach().clone() for p in model.parameters()]
    trainer = trainer_for(model, tmp_path)
    trainer.train()
    opt = trainer.zo_optimizer
    assert opt.forward_passes == 2 * STEPS and opt.steps_taken == STEPS
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), start))
    reference, losses, _ = direct_run()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    torch.testing.assert_close(torch.tensor(logged), torch.tensor(losses), rtol=1e-4, atol=1e-5)


def test_gradient_accumulation_is_one_zo_step_over_micro_batches(tmp_path):
    model = tiny_llama()
    trainer = trainer_for(model, tmp_path, accumulation=2)
    trainer.train()
    assert trainer.zo_optimizer.steps_taken == STEPS and trainer.zo_optimizer.forward_passes == 4 * STEPS
    reference, _, _ = direct_run(accumulation=2)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_frozen_parameters_stay_frozen(tmp_path):
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    frozen = model.model.embed_tokens.weight.detach().clone()
    trainer_for(model, tmp_path).train()
    assert torch.equal(model.model.embed_tokens.weight, frozen)
