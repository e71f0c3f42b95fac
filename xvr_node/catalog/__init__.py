"""The catalog: the node's database of patients, images, volumes, models, jobs and results."""
