# one detached chain: small stages 1-3 -> compression -> GRPO, then speed probes under the decoder-only attention policy
source .whl/pre.sh   # installs the wheels carried to the GPU machine (no network there) and sets $dev to h100 or h200
G=runs/gpu_out; R=$G/results
mkdir -p $R
step() { echo "=== $(date +%T) $1"; }
step grow
timeout 150 python bench/stages_gpu.py --grow-only --scale 16 --data runs/data16 2>&1 | tail -2
step stages
D=runs/data16
timeout 900 python -m torch.distributed.run --standalone --nproc_per_node=1 r1_scratch/launch.py --preset small --name stages-small --fresh train.out_dir=runs train.wandb=disabled "data.train=$D/train/{task}-{000000..000063}.tar" "data.val=$D/val/{task}-{000000..000001}.tar" data.tokenizer=$D/tokenizer.json train.eval_every=0 train.ckpt_every=0 stages.align.steps=750 stages.sft.steps=320 > $G/stages.log 2>&1
echo "rc $?"; grep -v Warn $G/stages.log | tail -30
for s in pretrain align sft; do cp runs/stages-small/$s/summary.json $G/summary_$s.json 2>/dev/null; cp runs/stages-small/$s/metrics.jsonl $G/metrics_$s.jsonl 2>/dev/null; done
step compress
timeout 480 python bench/compress.py --run runs/stages-small/sft --device cuda --batches 10 --answers 64 --out $R/compress_small_$dev.json > $G/compress.log 2>&1
echo "rc $?"; grep -v Warn $G/compress.log | tail -15
step grpo
timeout 720 python bench/grpo_gpu.py --run runs/stages-small --steps 40 --problems 200 --eval-batches 10 --out $R/grpo_small_$dev.json > $G/grpo.log 2>&1
echo "rc $?"; grep -v Warn $G/grpo.log | tail -30; cp runs/*grpo*.png $R/ 2>/dev/null
step mla_probe
timeout 60 python bench/mla_gpu.py --generation-only --arms mha mla --contexts 1024 --new-tokens 64 --out $R/mla_gen_$dev.json 2>&1 | grep "^mha\|^mla"
R1_CUDNN_ATTENTION=1 timeout 60 python bench/mla_gpu.py --generation-only --arms mha --contexts 1024 --new-tokens 64 --out $R/mla_gen_cudnn_$dev.json 2>&1 | grep "^mha"
step train_small
timeout 200 python bench/train_gpu.py --preset small --gpus 1 --steps 40 --cached 8 --eager-only --out $R/train_small_decoder_policy_$dev.json > $G/train_small.log 2>&1; echo "rc $?"; grep "^{" $G/train_small.log | cut -c1-600
step done
