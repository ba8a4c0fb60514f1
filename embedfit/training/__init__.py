"""Training and the transfer-learning comparison: the arms beside the frozen-feature probe.

    finetune  one training loop for fine-tuning (pretrained backbone, new head, freeze policy) and training from
              scratch; run directories of kind "torch"
    classify  the pretrained model as-is, with its own ImageNet classifier
    compare   as-is vs linear probe vs fine-tuning vs scratch on the same splits, in accuracy and in time
"""
