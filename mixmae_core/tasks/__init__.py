"""Transfer tasks on an encoder: fine-tuned classifier and linear probe, Mask R-CNN + FPN,
UperNet; their metrics and their pictures. Apart from the methods: a task wraps whichever
encoder a method pretrained."""
