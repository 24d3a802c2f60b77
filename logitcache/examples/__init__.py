"""What a classifier teacher and its students read: input examples (image folders, NumPy arrays,
Parquet and `datasets` tables) and the seeded augmented views of them. The dump and the trainer
both import this room, so the trainer replays a view with the very code that made it."""
