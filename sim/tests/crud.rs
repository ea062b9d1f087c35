//! What a person does with a small data set, through the real `mongodb` driver: CRUD with
//! the update operators and upserts, query operators, sort, projection, skip, limit, cursors
//! over several batches, unique indexes, the namespace commands, and what is refused
//! (unsupported operators, transactions) without being applied. Every write reaches the
//! secondaries through the oplog.

mod common;

use bson::{doc, Bson, Document};
use common::{code_of, stable_set, BoxError, TestResult, SETTLE};
use futures::TryStreamExt;
use mongodb::options::{ClientOptions, IndexOptions, ReturnDocument};
use mongodb::{Client, IndexModel};
use replset_sim::Cluster;
use std::time::Duration;

async fn set_and_client() -> Result<(Cluster, Client), BoxError> {
    let (c, _) = stable_set(3).await?;
    let mut opts = ClientOptions::parse(c.uri()).await?;
    opts.server_selection_timeout = Some(Duration::from_secs(15));
    let client = Client::with_options(opts)?;
    Ok((c, client))
}

fn ids(docs: &[Document]) -> Vec<i32> {
    docs.iter().filter_map(|d| d.get_i32("_id").ok()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_updates_and_deletes_give_the_servers_results() -> TestResult {
    let (c, client) = set_and_client().await?;
    let people = client.database("town").collection::<Document>("people");
    people
        .insert_many(vec![
            doc! {"_id": 1, "name": "ann", "age": 31, "tags": ["a", "b"]},
            doc! {"_id": 2, "name": "bob", "age": 25},
            doc! {"_id": 3, "name": "cid", "age": 40, "tags": ["b"]},
            doc! {"_id": 4, "name": "dee", "age": 25.5, "nick": null},
        ])
        .await?;

    let found: Vec<Document> = people
        .find(doc! {"age": {"$gte": 25, "$lt": 35}})
        .sort(doc! {"age": -1})
        .await?
        .try_collect()
        .await?;
    assert_eq!(ids(&found), vec![1, 4, 2]);
    let found: Vec<Document> = people
        .find(doc! {"$or": [{"tags": "b"}, {"name": {"$in": ["bob"]}}], "age": {"$ne": 40}})
        .sort(doc! {"_id": 1})
        .await?
        .try_collect()
        .await?;
    assert_eq!(ids(&found), vec![1, 2]);
    let found: Vec<Document> = people
        .find(doc! {"tags": {"$exists": false}, "age": {"$not": {"$gt": 25}}})
        .await?
        .try_collect()
        .await?;
    assert_eq!(ids(&found), vec![2]);
    let found: Vec<Document> = people
        .find(doc! {"nick": null, "name": {"$nin": ["ann", "cid"]}})
        .sort(doc! {"_id": -1})
        .skip(1)
        .limit(5)
        .projection(doc! {"name": 1, "_id": 0})
        .await?
        .try_collect()
        .await?;
    assert_eq!(found, vec![doc! {"name": "bob"}]);

    let r = people
        .update_one(
            doc! {"_id": 2},
            doc! {"$set": {"city": "x"}, "$inc": {"age": 1}, "$push": {"tags": "c"}},
        )
        .await?;
    assert_eq!((r.matched_count, r.modified_count), (1, 1));
    let r = people
        .update_many(
            doc! {"tags": "b"},
            doc! {"$addToSet": {"tags": "b"}, "$unset": {"age": ""}},
        )
        .await?;
    assert_eq!((r.matched_count, r.modified_count), (2, 2));
    let r = people
        .update_one(doc! {"name": "eve"}, doc! {"$set": {"age": 50}})
        .upsert(true)
        .await?;
    let eve = r.upserted_id.ok_or("no upserted id")?;
    let bob = people
        .find_one(doc! {"_id": 2})
        .await?
        .ok_or("bob is gone")?;
    assert_eq!(
        bob,
        doc! {"_id": 2, "name": "bob", "age": 26, "tags": ["c"], "city": "x"}
    );
    let ann = people
        .find_one(doc! {"_id": 1})
        .await?
        .ok_or("ann is gone")?;
    assert_eq!(ann, doc! {"_id": 1, "name": "ann", "tags": ["a", "b"]});
    let eve_doc = people
        .find_one(doc! {"_id": eve.clone()})
        .await?
        .ok_or("no eve")?;
    assert_eq!(eve_doc.get_str("name")?, "eve");
    assert_eq!(eve_doc.get_i32("age")?, 50);

    let before = people
        .find_one_and_update(doc! {"name": "cid"}, doc! {"$set": {"age": 41}})
        .await?
        .ok_or("no cid")?;
    assert!(before.get("age").is_none());
    let after = people
        .find_one_and_update(doc! {"name": "cid"}, doc! {"$inc": {"age": 1}})
        .return_document(ReturnDocument::After)
        .await?
        .ok_or("no cid")?;
    assert_eq!(after.get_i32("age")?, 42);

    assert_eq!(
        people
            .delete_one(doc! {"age": {"$gt": 40}})
            .await?
            .deleted_count,
        1
    );
    assert_eq!(
        people
            .delete_many(doc! {"_id": {"$in": [1, 2, 99]}})
            .await?
            .deleted_count,
        2
    );
    assert_eq!(people.count_documents(doc! {}).await?, 2);

    // Every member applied the same writes.
    c.wait_for("the secondaries to apply every write", SETTLE, |c| {
        let want = c.node(c.primary()?).ok()?.documents("town.people");
        (0..3)
            .all(|i| c.node(i).is_ok_and(|n| n.documents("town.people") == want))
            .then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursors_indexes_and_namespaces() -> TestResult {
    let (_c, client) = set_and_client().await?;
    let db = client.database("shop");
    let items = db.collection::<Document>("items");
    items
        .insert_many((0..250).map(|i| doc! {"_id": i, "sku": format!("s{i}")}))
        .await?;
    // Several getMore batches of 7, in _id order.
    let all: Vec<Document> = items
        .find(doc! {})
        .sort(doc! {"_id": 1})
        .batch_size(7)
        .await?
        .try_collect()
        .await?;
    assert_eq!(ids(&all), (0..250).collect::<Vec<_>>());

    items
        .create_index(
            IndexModel::builder()
                .keys(doc! {"sku": 1})
                .options(IndexOptions::builder().unique(true).build())
                .build(),
        )
        .await?;
    let e = items
        .insert_one(doc! {"_id": 1000, "sku": "s3"})
        .await
        .expect_err("a duplicate sku");
    assert_eq!(code_of(&e), Some(11000), "{e}");
    assert!(e.to_string().contains("index: sku_1 dup key"), "{e}");
    let e = items
        .update_one(doc! {"_id": 4}, doc! {"$set": {"sku": "s5"}})
        .await
        .expect_err("an update into a duplicate");
    assert_eq!(code_of(&e), Some(11000), "{e}");
    let names: Vec<String> = items.list_index_names().await?;
    assert_eq!(names, vec!["_id_".to_string(), "sku_1".to_string()]);

    db.create_collection("empty").await?;
    let e = db.create_collection("empty").await.expect_err("exists");
    assert_eq!(code_of(&e), Some(48), "{e}");
    let mut colls = db.list_collection_names().await?;
    colls.sort();
    assert_eq!(colls, vec!["empty".to_string(), "items".to_string()]);
    let dbs = client.list_database_names().await?;
    assert!(
        dbs.contains(&"shop".to_string()) && dbs.contains(&"local".to_string()),
        "{dbs:?}"
    );
    let stats = db.run_command(doc! {"dbStats": 1}).await?;
    assert_eq!(stats.get_i64("objects")?, 250);
    let cs = db.run_command(doc! {"collStats": "items"}).await?;
    assert_eq!(cs.get_i64("count")?, 250);
    assert_eq!(cs.get_i64("nindexes")?, 2);

    db.collection::<Document>("empty").drop().await?;
    assert_eq!(db.list_collection_names().await?, vec!["items".to_string()]);
    db.drop().await?;
    assert!(!client
        .list_database_names()
        .await?
        .contains(&"shop".to_string()));

    let admin = client.database("admin");
    let status = admin.run_command(doc! {"serverStatus": 1}).await?;
    assert!(status.get_document("repl")?.get_str("setName").is_ok());
    assert!(status.get_document("connections")?.get_i32("current")? >= 1);
    assert_eq!(status.get_str("process")?, "mongod");
    let opts = admin.run_command(doc! {"getCmdLineOpts": 1}).await?;
    assert_eq!(
        opts.get_document("parsed")?
            .get_document("replication")?
            .get_str("replSet")?,
        "rs0"
    );
    let log = admin
        .run_command(doc! {"getLog": "startupWarnings"})
        .await?;
    assert!(log.get_array("log")?.iter().any(|l| l
        .as_str()
        .is_some_and(|s| s.contains("Access control is not enabled"))));
    admin.run_command(doc! {"hostInfo": 1}).await?;
    admin.run_command(doc! {"connectionStatus": 1}).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_out_of_scope_is_refused_and_not_applied() -> TestResult {
    let (c, client) = set_and_client().await?;
    let coll = client.database("t").collection::<Document>("c");
    coll.insert_one(doc! {"_id": 1, "a": [1, 2]}).await?;
    for filter in [
        doc! {"a": {"$elemMatch": {"$gt": 1}}},
        doc! {"a": {"$foo": 1}},
        doc! {"$where": "true"},
        doc! {"a": {"$regex": "x"}},
    ] {
        let e = coll.find_one(filter.clone()).await.expect_err("refused");
        assert_eq!(code_of(&e), Some(2), "{filter}: {e}");
    }
    let e = coll
        .update_one(doc! {"_id": 1}, doc! {"$foo": {"a": 1}})
        .await
        .expect_err("unknown modifier");
    assert_eq!(code_of(&e), Some(9), "{e}");

    // A transaction: refused, and its insert is not applied.
    let mut session = client.start_session().await?;
    session.start_transaction().await?;
    let e = coll
        .insert_one(doc! {"_id": 2})
        .session(&mut session)
        .await
        .expect_err("transactions are refused");
    assert_eq!(code_of(&e), Some(20), "{e}");
    let _ = session.abort_transaction().await;
    assert_eq!(coll.count_documents(doc! {}).await?, 1);
    let p = c.primary().ok_or("no primary")?;
    assert_eq!(c.node(p)?.documents("t.c").len(), 1);
    assert_eq!(
        coll.find_one(doc! {})
            .await?
            .and_then(|d| d.get("a").cloned()),
        Some(Bson::Array(vec![Bson::Int32(1), Bson::Int32(2)]))
    );
    Ok(())
}
