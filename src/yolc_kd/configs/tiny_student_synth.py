# Tiny YOLC student for the synthetic aerial data (`yolc-kd synth --classes 4 --size 384x256`), CPU friendly.
classes = ('pedestrian', 'people', 'bicycle', 'car')
seed = 0


def _stage(branches, block, blocks, channels):
    return dict(num_modules=1, num_branches=branches, block=block, num_blocks=blocks, num_channels=channels)


model = dict(
    type='YOLC',
    backbone=dict(type='HRNet', extra=dict(
        stage1=_stage(1, 'BOTTLENECK', (1,), (16,)),
        stage2=_stage(2, 'BASIC', (1, 1), (8, 16)),
        stage3=_stage(3, 'BASIC', (1, 1, 1), (8, 16, 32)),
        stage4=_stage(4, 'BASIC', (1, 1, 1, 1), (8, 16, 32, 64)))),
    neck=dict(type='HRFPN', in_channels=[8, 16, 32, 64], out_channels=32, num_outs=1),
    bbox_head=dict(type='YOLCHead', num_classes=4, in_channel=32, feat_channel=16, heatmap_prior_prob=0.01),
    test_cfg=dict(topk=300, local_maximum_kernel=3, max_per_img=300, nms_cfg=dict(iou_threshold=0.6),
                  # patch_budget (yolc-kd, inference only): patches cover at most 0.34 x the image after upscaling,
                  # fused inference then costs ~1.3x the full-image pass (BENCHMARKS.md); enlarge/upscale also set KD crops
                  crop=dict(max_patches=2, min_patch_size=48, enlarge=1.2, upscale=1.5, fusion='nms', patch_budget=0.34)))

train_pipeline = [
    dict(type='LoadImageFromFile', to_float32=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PhotoMetricDistortion', brightness_delta=32, contrast_range=(0.5, 1.5),
         saturation_range=(0.5, 1.5), hue_delta=18),
    dict(type='RandomCenterCropPad', crop_size=(384, 256), ratios=(0.8, 0.9, 1.0, 1.1, 1.2),
         mean=[0, 0, 0], std=[1, 1, 1], to_rgb=True, test_pad_mode=None),
    dict(type='Resize', img_scale=(384, 256), keep_ratio=True),
    dict(type='RandomFlip', flip_ratio=0.5),
    dict(type='Normalize', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True),
    dict(type='DefaultFormatBundle'),
    dict(type='Collect', keys=['img', 'gt_bboxes', 'gt_labels']),
]
data = dict(samples_per_gpu=8, workers_per_gpu=1)
optimizer = dict(type='Adam', lr=0.002)
optimizer_config = dict(grad_clip=dict(max_norm=35, norm_type=2))
lr_config = dict(policy='step', warmup='linear', warmup_iters=30, warmup_ratio=0.1, step=[400])
runner = dict(type='IterBasedRunner', max_iters=300)
checkpoint_config = dict(interval=100)
log_config = dict(interval=10)
# short runs: the head BN's running statistics (momentum 0.01 as YOLC) are recomputed after training
precise_bn = dict(num_batches=20)
# checkpoints hold an average of the weights over the last ~20 iterations (mmdet's EMA hook, train/ema.py): on the
# KD benchmark it takes the end point out of a run's swing (momentum picked on seeds 0-1, BENCHMARKS.md)
custom_hooks = [dict(type='ExpMomentumEMAHook', momentum=0.05, total_iter=100)]

distill_cfg = dict(
    enable=True,
    teacher_ckpt=None,
    teacher_config='./tiny_teacher_synth.py',
    # normalised KD: heatmap per teacher peak, boxes weighted by teacher confidence. Heatmap weight 8:
    # swept 1 vs 8 over three seeds (BENCHMARKS.md); the soft-focal term fades once the student is close, and at
    # 8 every term starts at 0.4x-1.5x the supervised heatmap loss (tests/test_kd_scale.py)
    hm_kd='soft_focal',
    box_kd='weighted',
    box_kd_distance='gwd_l1',
    kd_weight_global_hm=8.0,
    kd_weight_global_coarse=1.0,
    kd_weight_local_refine=1.0,
    use_teacher_crop=True,
    max_patches_per_img=2,
    min_patch_size=48,
    lsm_visualize=False)
