"""The public environment: what runs on the untrusted side, outside the private one.

:mod:`asymflow.public.local` trains and serves M_res in process (:class:`LocalPublic`); the
gRPC server of :mod:`asymflow.transport` hosts the same class. Of the private side it imports
only :mod:`asymflow.delta.contract`, the types and protocols that cross between the two.
"""
