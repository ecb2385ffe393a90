# YOLC teacher as in the paper: HRNet-w48 + HRFPN(384) + YOLCHead, VisDrone (10 classes) at 1024x640.
# Same structure and keys as YOLC's configs/yolc.py, so its checkpoints load strictly.
dataset_type = 'VisDroneDataset'
data_root = 'data/VisDrone2019/'
classes = ('pedestrian', 'people', 'bicycle', 'car', 'van', 'truck', 'tricycle', 'awning-tricycle', 'bus', 'motor')
num_classes = 10
img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
train_pipeline = [
    dict(type='LoadImageFromFile', to_float32=True, color_type='color'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PhotoMetricDistortion', brightness_delta=32, contrast_range=(0.5, 1.5),
         saturation_range=(0.5, 1.5), hue_delta=18),
    dict(type='RandomCenterCropPad', crop_size=(1024, 640), ratios=(0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3),
         mean=[0, 0, 0], std=[1, 1, 1], to_rgb=True, test_pad_mode=None),
    dict(type='Resize', img_scale=(1024, 640), keep_ratio=True),
    dict(type='RandomFlip', flip_ratio=0.5),
    dict(type='Normalize', **img_norm_cfg),
    dict(type='DefaultFormatBundle'),
    dict(type='Collect', keys=['img', 'gt_bboxes', 'gt_labels']),
]
test_pipeline = [
    dict(type='LoadImageFromFile', to_float32=True),
    dict(type='MultiScaleFlipAug', scale_factor=1.0, flip=False, transforms=[
        dict(type='Resize', keep_ratio=True),
        dict(type='RandomCenterCropPad', ratios=None, border=None, mean=[0, 0, 0], std=[1, 1, 1], to_rgb=True,
             test_mode=True, test_pad_mode=['logical_or', 31], test_pad_add_pix=1),
        dict(type='RandomFlip'),
        dict(type='Normalize', **img_norm_cfg),
        dict(type='DefaultFormatBundle'),
        dict(type='Collect', keys=['img'], meta_keys=('filename', 'ori_shape', 'img_shape', 'pad_shape',
                                                      'scale_factor', 'flip', 'flip_direction', 'img_norm_cfg',
                                                      'border'))])
]
data = dict(
    samples_per_gpu=4,
    workers_per_gpu=4,
    train=dict(type='RepeatDataset', times=5,
               dataset=dict(type=dataset_type, classes=classes,
                            ann_file=data_root + 'annotations/train_coco.json',
                            img_prefix=data_root + 'VisDrone2019-DET-train/images',
                            pipeline=train_pipeline)),
    val=dict(type=dataset_type, classes=classes, ann_file=data_root + 'annotations/val_coco.json',
             img_prefix=data_root + 'VisDrone2019-DET-val/images'),
    test=dict(type=dataset_type, classes=classes, ann_file=data_root + 'annotations/val_coco.json',
              img_prefix=data_root + 'VisDrone2019-DET-val/images'))
evaluation = dict(interval=1, metric='bbox')
optimizer = dict(type='SGD', lr=0.0025, momentum=0.9, weight_decay=0.0001)
optimizer_config = dict(grad_clip=dict(max_norm=35, norm_type=2))
lr_config = dict(policy='step', warmup='linear', warmup_iters=1000, warmup_ratio=0.001, step=[18, 24])
runner = dict(type='EpochBasedRunner', max_epochs=48)
checkpoint_config = dict(interval=1)
log_config = dict(interval=50, hooks=[dict(type='TextLoggerHook')])
custom_hooks = [dict(type='NumClassCheckHook')]
dist_params = dict(backend='nccl')
log_level = 'INFO'
load_from = None
resume_from = None
workflow = [('train', 1)]
work_dir = './work_dir/yolc_hrnet'
gpu_ids = range(0, 5)


def _stage(modules, branches, block, blocks, channels):
    return dict(num_modules=modules, num_branches=branches, block=block, num_blocks=blocks, num_channels=channels)


model = dict(
    type='YOLC',
    backbone=dict(type='HRNet', extra=dict(
        stage1=_stage(1, 1, 'BOTTLENECK', (4,), (64,)),
        stage2=_stage(1, 2, 'BASIC', (4, 4), (48, 96)),
        stage3=_stage(4, 3, 'BASIC', (4, 4, 4), (48, 96, 192)),
        stage4=_stage(3, 4, 'BASIC', (4, 4, 4, 4), (48, 96, 192, 384)))),
    neck=dict(type='HRFPN', in_channels=[48, 96, 192, 384], out_channels=384, num_outs=1),
    bbox_head=dict(type='YOLCHead', num_classes=num_classes, in_channel=384, feat_channel=96,
                   loss_center_local=dict(type='GaussianFocalLoss', loss_weight=1.0),
                   loss_xywh=dict(type='GWDLoss', loss_weight=2.0)),
    train_cfg=None,
    test_cfg=dict(topk=1000, local_maximum_kernel=3, max_per_img=300, nms_cfg=dict(iou_threshold=0.60)))
