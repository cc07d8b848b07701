//! RabbitMQ bus (being written).
