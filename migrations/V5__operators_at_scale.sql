-- V5: indexes that let `redrive status` read a large table without scanning it.

-- Paused rows, by topic and group: status counts them, its error summary reads them, and
-- `redrive.resume()` finds them, without a scan. Rows only enter this index while their topic is
-- paused, so capture and claims do not pay for it.
CREATE INDEX retry_messages_paused ON redrive.retry_messages (topic, consumer_group)
    WHERE state = 'paused';

-- Dead rows the DLQ broker refused for good, by group. Refusals are rare, so the index stays small.
CREATE INDEX retry_messages_dlq_refused ON redrive.retry_messages (consumer_group)
    WHERE state = 'dead' AND dlq_refused_at IS NOT NULL;
