"""The folder command at scale: `wbc-segment --engine ray` runs the engine over a Ray cluster.

- `ray_data`: the Ray Data job (read tasks → model actors running `Engine.segment_many` → write tasks)
- `records`: the manifest, the progress record that `--resume` reads, the Parquet tables; no Ray

Ray and pyarrow are the `scale` extra: nothing here is imported unless `--engine ray` asks for it.
"""
