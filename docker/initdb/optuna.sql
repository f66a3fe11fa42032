-- Run once by the postgres image when it creates the cluster (/docker-entrypoint-initdb.d): the database that
-- Optuna studies shared by several workers live in (hydra.sweeper.storage), beside MLflow's. Its own database:
-- Optuna and MLflow both keep an alembic_version table. scripts/tracking_server.sh creates the same one natively.
CREATE DATABASE optuna;
