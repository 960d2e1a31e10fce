from vggnorm.cli import entrypoint

entrypoint()
