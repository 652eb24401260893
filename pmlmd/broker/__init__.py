"""The AMQP broker (RabbitMQ) through pika: a queue batch's intake and ``pmlmctl enqueue``.

pika is imported only when a queue batch or ``enqueue`` needs it.
"""
