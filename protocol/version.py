"""The one protocol version number that bundles, manifests and messages carry.

Bump it whenever a message layout, the bundle manifest or a graph signature changes in a way an
older peer could misread. Readers refuse anything newer than what they know.
"""

PROTOCOL_VERSION = 1
