//! DynamoDB tables (being written).
