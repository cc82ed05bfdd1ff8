import sys, time, torch
sys.path.insert(0, "/work/main/tests/stamp_core")
from _tasks import make_episode, make_images
from stamp_core import (MetaConfig, StampPruner, TrainConfig, build_backbone, make_optimizer, meta_train_step,
                        train_classifier, prune_and_finetune, TaskSummary)
torch.set_num_threads(1)
gen_mode = sys.argv[1]; objective = sys.argv[2]; seed = int(sys.argv[3]); episodes = int(sys.argv[4]); ratio=float(sys.argv[5])
torch.manual_seed(seed)
gen = torch.Generator().manual_seed(seed)
labels = torch.arange(12).repeat(150)
x = torch.cat([make_images("color", labels[:900] % 6, gen), make_images("orientation", labels[900:] % 6, gen)])
y = torch.cat([labels[:900] % 6, 6 + labels[900:] % 6])
backbone = build_backbone("small_cnn", 12, width=16)
train_classifier(backbone, x, y, TrainConfig(epochs=3, batch_size=64, lr=0.05, augment=False))
pruner = StampPruner.create(backbone, generator=gen_mode)
untrained = StampPruner.create(backbone, generator=gen_mode)
opt = make_optimizer(pruner, lr=1e-3, backbone_lr=1e-4)
fam = ["color", "orientation"]
t=time.time()
for i in range(0, episodes, 4):
    batch = [make_episode(fam[int(torch.randint(2, (), generator=gen))], gen, macs_ratio=None) for _ in range(4)]
    meta_train_step(pruner, batch, opt, MetaConfig(objective=objective, inner_steps=2 if objective=="deployed" else 0))
print("train s", time.time()-t)
def task(family, s):
    g = torch.Generator().manual_seed(s)
    ytr = torch.arange(6).repeat_interleave(20); yte = torch.arange(6).repeat_interleave(40)
    return make_images(family, ytr, g), ytr, make_images(family, yte, g), yte
tasks = {f: task(f, 1000 + k) for k, f in enumerate(fam)}
ft = TrainConfig(epochs=2, batch_size=32, lr=0.02, augment=False)
for name, p in (("trained", pruner), ("untrained", untrained)):
    summ = {f: p.summarize(tasks[f][0], tasks[f][1]) for f in fam}
    mean = TaskSummary.mean(list(summ.values()))
    for f in fam:
        other = [o for o in fam if o != f][0]
        res = {}
        for label, s in (("own", summ[f]), ("other", summ[other]), ("mean", mean)):
            spec = p.generate(tasks[f][0], tasks[f][1], macs_ratio=ratio, embedding=s)
            accs=[]
            for fts in range(2):
                import dataclasses
                r = prune_and_finetune(p.backbone, spec, tasks[f][0], tasks[f][1], tasks[f][2], tasks[f][3], dataclasses.replace(ft, seed=fts))
                accs.append(r.accuracy)
            res[label] = sum(accs)/len(accs)
        print(gen_mode, objective, seed, name, f, {k: round(100*v,1) for k,v in res.items()}, flush=True)
