# HRNet-w18 YOLC student distilled from the HRNet-w48 teacher (configs/yolc_hrnet_w48_visdrone.py).
_base_ = './yolc_hrnet_w48_visdrone.py'

model = dict(
    backbone=dict(extra=dict(
        stage2=dict(num_channels=(18, 36)),
        stage3=dict(num_channels=(18, 36, 72)),
        stage4=dict(num_channels=(18, 36, 72, 144)))),
    neck=dict(in_channels=[18, 36, 72, 144], out_channels=128),
    bbox_head=dict(in_channel=128, feat_channel=64))

distill_cfg = dict(
    enable=True,
    teacher_ckpt='work_dirs/yolc_w48/latest.pth',
    teacher_config='./yolc_hrnet_w48_visdrone.py',
    # MSE is a mean over C*H*W = 10*640*1024 probabilities: scaled like the tiny config's swept 2.5*C*H*W
    # (untested at this scale; sweep it, the cache makes each try cost only student steps)
    kd_weight_global_hm=1.6e7,
    kd_weight_global_coarse=1.0,
    kd_weight_local_refine=1.0,
    use_teacher_crop=True,
    max_patches_per_img=4,
    min_patch_size=64,
    lsm_visualize=False)
