-- V26: how many masked rows an online rebuild copied as they were. Never edit once merged: add V27.
--
-- A rotation re-masks the rows whose bodies are kept; the others (bodies purged, or their day
-- dropped by retention) are copied as they were and keep the key that masked them. The command
-- now says how many (sql/35_rebuild.sql counts them per range), so whoever rotates a key knows
-- how many rows stay under an older one. NULL for rebuilds from before it.
alter table loader.rebuilds add column kept_as_is bigint;
