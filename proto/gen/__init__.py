# generated; do not edit
"""Generated protobuf modules. They register in ``POOL``, not protobuf's default pool."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
