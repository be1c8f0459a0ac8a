-- V19: a retention period for the masked data (sql/40_retention.sql, `loader purge
-- --masked-older-than-months`). Never edit once merged: add V20.
--
-- Masked rows are personal data too (pseudonymised data is personal data under the GDPR), so
-- public.user_logins rows end once their create_date is older than the period the deployment
-- chooses: batched deletes, which work on every table, the adopted one included.

-- When retention ended the message's user_logins row: the staged row stays (a redelivery is a
-- duplicate), its body goes with the masked row, and reconcile counts it as accounted for.
alter table loader.raw_logins add column expired_at timestamptz;

-- The expiries: one row per cutoff, written by every batch, so what ended when (and up to which
-- day the masked data is gone) is on record without a user id, and downstream copies can end
-- the same rows.
create table loader.mask_expiries (
    cutoff date constraint mask_expiries_pkey primary key,
    started_at timestamptz not null,
    finished_at timestamptz,
    requested_by text not null,
    expired bigint not null default 0,
    before_loader bigint not null default 0,
    bodies bigint not null default 0
);

-- The batches walk user_logins by create_date. On a large adopted table, create it beforehand
-- with CREATE INDEX CONCURRENTLY under the same name: this then only checks that it is there.
create index if not exists user_logins_create_date on public.user_logins (create_date);
-- IF NOT EXISTS goes by the name alone: make sure it is this index, valid, on this table (a
-- relation of that name made beforehand by someone else would leave every batch a full scan).
do $$
begin
    if not exists (select from pg_index i
                    where i.indexrelid = to_regclass('public.user_logins_create_date')
                      and i.indrelid = 'public.user_logins'::regclass and i.indisvalid
                      and pg_get_indexdef(i.indexrelid) like '%USING btree (create_date)') then
        raise exception 'public.user_logins_create_date is not a valid index on user_logins (create_date)'
            using hint = 'drop or rename whatever has that name (or an invalid index left by a failed CREATE INDEX CONCURRENTLY), then run loader migrate again';
    end if;
end
$$;
