# Tiny YOLC teacher for the synthetic aerial data (4 classes, 384x256): twice the student's widths.
# The demo's shipped checkpoint is trained with (see BENCHMARKS.md / README):
#   yolc-kd synth --out demo_data/train --num-images 200 --seed 0 --size 384x256 --classes 4
#   yolc-kd train --config configs/tiny_teacher_synth.py --ann demo_data/train/annotations.json \
#       --images demo_data/train --work-dir work_dirs/tiny_teacher
_base_ = './tiny_student_synth.py'

model = dict(
    backbone=dict(extra=dict(
        stage2=dict(num_channels=(16, 32)),
        stage3=dict(num_channels=(16, 32, 64)),
        stage4=dict(num_channels=(16, 32, 64, 128), num_blocks=(2, 2, 2, 2)))),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=64),
    bbox_head=dict(in_channel=64, feat_channel=32))

lr_config = dict(policy='step', warmup='linear', warmup_iters=50, warmup_ratio=0.1, step=[430])
runner = dict(type='IterBasedRunner', max_iters=500)
custom_hooks = []  # the shipped teacher was trained without the student's weight average
checkpoint_config = dict(interval=100)
log_config = dict(interval=20)
distill_cfg = None
