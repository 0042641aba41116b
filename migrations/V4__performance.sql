-- V4: cheaper writes on the hot paths, and indexes for the operators' filters.

-- Wake-ups, once per statement. The row triggers called plpgsql for every captured row and for
-- every row a claim touched; these read the rows the statement changed from the transition table
-- the pause triggers already keep. The channels and what they mean are unchanged.
CREATE FUNCTION redrive.notify_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM changed WHERE state = 'pending') THEN
        PERFORM pg_notify('redrive_pending', '');
    END IF;
    IF EXISTS (SELECT 1 FROM changed WHERE state = 'dead' AND dlq_published_at IS NULL) THEN
        PERFORM pg_notify('redrive_dead', '');
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER retry_messages_notify_insert ON redrive.retry_messages;
DROP TRIGGER retry_messages_notify_update ON redrive.retry_messages;
DROP FUNCTION redrive.notify_change();

CREATE TRIGGER retry_messages_notify_insert
    AFTER INSERT ON redrive.retry_messages REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION redrive.notify_changed();
CREATE TRIGGER retry_messages_notify_update
    AFTER UPDATE ON redrive.retry_messages REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION redrive.notify_changed();

-- Dead and replayed rows of one topic or one consumer group, in the order replay and purge walk
-- them: `replay --topic`/`--group` and their dry runs read only the rows they select, however large
-- the table. Rows that are pending or running are not in these indexes, so capture and claims do
-- not pay for them.
CREATE INDEX retry_messages_finished_topic ON redrive.retry_messages (topic, dead_at, id)
    WHERE state IN ('dead', 'replayed');
CREATE INDEX retry_messages_finished_group ON redrive.retry_messages (consumer_group, dead_at, id)
    WHERE state IN ('dead', 'replayed');
