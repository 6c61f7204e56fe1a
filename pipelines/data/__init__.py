"""The data layer: dataset layouts -> manifests (or packed shards) -> Ray Data pipelines.

Modules (imported one by one, so the CLI and the decode path stay free of Ray and torch):

* ``layouts``: readers for imagefolder, inat, places, coco and ade20k folders.
* ``manifest``: ``build_manifest`` / ``write_manifest`` / ``pack_manifest`` / ``open_source``.
* ``decode``: ``decode_image``, the one decode path of training and ``mixmae data check``.
* ``transforms``: per-image transforms (uint8 out).
* ``datasets``: ``build_dataset`` and the pretrain / classify / detect / segment builders,
  ``coco_ground_truth`` (no torch: planning and coordinating processes import it).
* ``collate``: ``PairCollate``, ``DetectionCollate``, ``normalize_on_device`` (worker side).
* ``quality``: ``SkipCounter`` / ``skip_counter``, ``check_skip_threshold``, ``DataQualityError``.
* ``synth``: ``write_synthetic`` and ``SYNTH_LAYOUTS``.
"""
