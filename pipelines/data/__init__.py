"""The data layer: dataset layouts -> manifests (or packed shards) -> Ray Data pipelines.

Modules (imported one by one, so the CLI and the decode path stay free of Ray and torch):

* ``layouts``: readers for imagefolder, inat, places, coco and ade20k folders.
* ``manifest``: ``build_manifest`` / ``write_manifest`` / ``pack_manifest`` / ``open_source``.
* ``decode``: ``decode_image``, the one image decode path of training and ``mixmae data check``.
* ``transforms``: per-image transforms (uint8 out).
* ``order``: each epoch's order and pairing, as streams of units.
* ``samples``: decoding per task (pairs, classification, detection, segmentation samples).
* ``datasets``: the builders per task and ``coco_ground_truth`` (no torch: planning and
  coordinating processes import it).
* ``ray_internals``: every private Ray API used, why, and what to rerun when Ray changes;
  ``StageDataConfig`` (how a stage's datasets reach its workers).
* ``collate``: ``PairCollate``, ``DetectionCollate``, ``normalize_on_device`` (worker side).
* ``quality``: the ``SkipCounter`` actor, ``StageSkips``, ``check_skip_threshold``.
* ``synth``: ``write_synthetic`` and ``SYNTH_LAYOUTS``.
"""
