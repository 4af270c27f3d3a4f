"""Channel-A: files, git, terminal exec and PTYs against any box, with change events.

Use :class:`ChannelA` over a :class:`sandbox.box.BoxSession`; results are the models of
:mod:`sandbox.channel_a.models`, events go to an :class:`EventSink` (:class:`NatsEventSink` in
production, :class:`MemoryEventSink` in tests).
"""

from sandbox.channel_a.events import ChannelAEvent, EventSink, MemoryEventSink, NatsEventSink, events_subject
from sandbox.channel_a.pty import PtyLauncher
from sandbox.channel_a.service import ChannelA

__all__ = [
    "ChannelA",
    "ChannelAEvent",
    "EventSink",
    "MemoryEventSink",
    "NatsEventSink",
    "PtyLauncher",
    "events_subject",
]
