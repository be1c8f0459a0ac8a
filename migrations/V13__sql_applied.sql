-- Which sql/ files the schema holds: `loader migrate` records the md5 of the sql/ files it
-- applied (all of them, in order), so `loader doctor` can tell whether the functions in the
-- database are the ones its binary carries. One row; owner only.
create table loader.sql_applied (
    singleton boolean primary key default true constraint sql_applied_one_row check (singleton),
    sql_md5 text not null,
    loader_version text not null,
    applied_at timestamptz not null default now()
);
comment on table loader.sql_applied is 'The sql/ files the last loader migrate applied (md5), for loader doctor';
comment on column loader.sql_applied.singleton is 'Always true: one row';
comment on column loader.sql_applied.sql_md5 is 'md5 of every sql/ file, concatenated in order';
comment on column loader.sql_applied.loader_version is 'The loader version that applied them';
comment on column loader.sql_applied.applied_at is 'When';
