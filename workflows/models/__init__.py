"""Every model that crosses the Temporal boundary: workflow inputs, updates, queries, activity I/O.

They travel as JSON (``pydantic_data_converter``), so module paths never appear in a history and a
scheduler in another language can call the workflows; fields with defaults can be added without
breaking running workflows. Pure: nothing here does I/O, so workflows, activities, the store and the
client all import from here (activities -> workflows, never the reverse).

- :mod:`~workflows.models.lease`: the lease workflow's input, state, updates and query.
- :mod:`~workflows.models.boxes`: the lease's box, snapshot, projection and seed activities.
- :mod:`~workflows.models.planes`: desktop and terminal plane activities.
- :mod:`~workflows.models.computer_use`: screenshots and desktop input.
- :mod:`~workflows.models.recording`: the recording workflow and its activities.
- :mod:`~workflows.models.maintenance`: snapshot GC and orphan sweep.
- :mod:`~workflows.models.session_events`: the session events the lease publishes.

Activity names are :class:`workflows.activity_names.ActivityName`.
"""
